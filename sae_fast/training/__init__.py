"""Training SAEs on activation sources: options, the loop, losses, metrics, run checkpoints.

- config: TrainConfig (every option of `sae-fast train`, its help, file loading, checks);
- trainer: Trainer, the step and the loop, exact resume;
- multi: MultiTrainer, one SAE per hook point from one model pass;
- losses: each activation's loss terms (reconstruction, AuxK, L1, L0, gated aux);
- metrics: MSE/FVU/L0, dead and dense latent counters, the JSONL log;
- checkpoints: atomic step-N folders of the run state, rotation;
- loggers: TensorBoard and wandb beside the JSONL log;
- plots: training curves and the firing-frequency histogram.
The names below import on first use (sae_fast.lazy): the config needs no torch.
"""

from ..lazy import exports

_EXPORTS = {
    "ConfigError": ".config",
    "MultiTrainer": ".multi",
    "TrainConfig": ".config",
    "TrainResult": ".trainer",
    "Trainer": ".trainer",
    "TrainingDivergedError": ".trainer",
    "train": ".trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__ = exports(__name__, _EXPORTS)
