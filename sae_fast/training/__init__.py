"""Training SAEs on activation sources: options, the loop, losses, metrics, run checkpoints.

- config: TrainConfig (every option of `sae-fast train`, its help, file loading, checks);
- trainer: Trainer, the step and the loop, exact resume;
- losses: each activation's loss terms (reconstruction, AuxK, L1, L0, gated aux);
- metrics: MSE/FVU/L0, dead and dense latent counters, the JSONL log;
- checkpoints: atomic step-N folders of the run state, rotation;
- plots: training curves and the firing-frequency histogram.
"""

from .config import ConfigError, TrainConfig
from .trainer import Trainer, TrainingDivergedError, TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "Trainer", "TrainingDivergedError", "train"]
