"""Training SAEs on activation sources: options, the loop, losses, metrics, run checkpoints.

- config: TrainConfig (every option of `sae-fast train`, its help, file loading, checks);
- trainer: Trainer, the step and the loop;
- run_folder: a run folder's lock, the checkpoint a run starts from, the options a resume
  may change, abandoned branches;
- run_state: what a checkpoint holds of the trainer and the exact resume from it;
- loop: the loop's logs and bar, Ctrl-C between steps;
- multi: MultiTrainer, one SAE per hook point from one model pass;
- clt_trainer: CLTTrainer, a cross-layer transcoder over a model's layers;
- crosscoder_trainer: CrosscoderTrainer, one dictionary over several hook points or models;
- losses: each activation's loss terms (reconstruction, AuxK, L1, L0, gated aux);
- clt_losses: a cross-layer transcoder's (per-layer reconstruction, AuxK, sparsity);
- metrics: MSE/FVU/L0, dead and dense latent counters, the JSONL log;
- checkpoints: atomic step-N folders of the run state, rotation;
- loggers: TensorBoard and wandb beside the JSONL log;
- plots: training curves and the firing-frequency histogram.
The names below import on first use (sae_fast.lazy): the config needs no torch.
"""

from ..lazy import exports

_EXPORTS = {
    "CLTTrainer": ".clt_trainer",
    "CrosscoderTrainer": ".crosscoder_trainer",
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
