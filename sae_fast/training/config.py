"""TrainConfig: every option of a training run, with its help text, file loading and checks.

The command line (`sae-fast train`) is generated from these fields, so each option has one
name, default and help text; a JSON or TOML config file uses the same names, and flags given
on the command line override it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from ..files import parse_json, read_text
from ..options import (
    ACTIVATION_DTYPES,
    ACTIVATIONS,
    ADAM_MOMENTS,
    AUTOCAST_DTYPES,
    BACKENDS,
    CLT_ACTIVATIONS,
    PARAMETER_DTYPES,
    check_matryoshka,
    clt_hooks,
    integer,
    is_int,
    parse_hooks,
    parse_matryoshka,
)

SOURCE_CHOICES = ("model", "cache", "synthetic")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


class ConfigError(ValueError):
    """An option has a bad value; the message names the option."""


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a TrainConfig field, from its annotation."""
    name = str(f.type)
    optional = name.endswith(" | None")
    return {"int": int, "float": float, "str": str, "bool": bool}[
        name.removesuffix(" | None")
    ], optional


def check_device(name: str, option: str = "device") -> str:
    """name if it is auto, cpu, cuda or cuda:N, else ConfigError naming option."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ConfigError(f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def resolve_device(name: str) -> torch.device:
    """The torch device for a checked device name; 'auto' is cuda where there is one."""
    import torch  # here: the command line reads this module before torch is needed

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but this machine has no CUDA device")
    return device


def _is_a(value: Any, kind: type) -> bool:
    if kind is int:
        return is_int(value)  # bool is an int subclass, but True is not a step count
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


# On --resume an option either applies from the resumed step on (logged when it changed) or
# must equal the checkpoint's (refused otherwise): it shaped the parameters or the data.
APPLY, REFUSE = "apply", "refuse"


def _opt(
    default: Any, help: str, group: str, choices: tuple | None = None, resume: str = APPLY
) -> Any:
    meta = {"help": help, "group": group, "choices": choices, "resume": resume}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Options of `sae-fast train`; see each field's help (shown by `sae-fast train --help`)."""

    # --- activations -------------------------------------------------------------------
    source: str = _opt(
        "model",
        "where activations come from: a transformers model and hook point, an on-disk "
        "cache written by `sae-fast cache`, or synthetic data with a known dictionary",
        "data",
        SOURCE_CHOICES,
        resume=REFUSE,
    )
    model: str | None = _opt(
        None, "transformers model name or local folder (source=model)", "data", resume=REFUSE
    )
    crosscoder: bool = _opt(
        False,
        "train one dictionary over several hook points at once (an acausal crosscoder): "
        "--hooks of one model, or --hook/--hooks of --model and --model-b; each latent has "
        "a decoder per source",
        "data",  # (what the dictionary reads: the commands that reread its data need it)
        resume=REFUSE,
    )
    model_b: str | None = _opt(
        None,
        "a crosscoder's second model (with --crosscoder), run on the same tokens: the "
        "dictionary reads hook (or hooks) in both, for model diffing (`sae-fast diff`)",
        "data",
        resume=REFUSE,
    )
    hook: str | None = _opt(
        None,
        "hook point: resid_post.L, mlp_out.L, attn_out.L or a module path (source=model)",
        "data",
        resume=REFUSE,
    )
    hooks: str | None = _opt(
        None,
        "several hook points, one SAE each from one model forward per batch, e.g. "
        "resid_post.0-5 or resid_post.2,mlp_out.2 (instead of hook; each SAE's run is the "
        "folder out_dir/HOOK)",
        "data",
        resume=REFUSE,
    )
    hook_in: str | None = _opt(
        None,
        "train a transcoder: the hook point it reads (with hook_out, instead of hook), e.g. "
        "mlp_in.3",
        "data",
        resume=REFUSE,
    )
    hook_out: str | None = _opt(
        None,
        "the hook point a transcoder predicts, from the same forward, e.g. mlp_out.3",
        "data",
        resume=REFUSE,
    )
    layers: str | None = _opt(
        None,
        "a cross-layer transcoder's layers A-B (with --clt): its features read mlp_in.A..B "
        "and write mlp_out.A..B, from one model forward",
        "data",
        resume=REFUSE,
    )
    text: str = _opt(
        "stdlib",
        "text to run the model on: 'stdlib' (Python's standard-library docstrings), a .txt "
        "file (documents split at blank lines) or a .jsonl file with a 'text' field",
        "data",
        resume=REFUSE,
    )
    context_size: int = _opt(128, "tokens per model forward window", "data", resume=REFUSE)
    model_batch_size: int = _opt(32, "windows per model forward", "data", resume=REFUSE)
    shuffle_buffer: int = _opt(
        16384, "activations held for shuffling (source=model)", "data", resume=REFUSE
    )
    model_dtype: str | None = _opt(
        None,
        "dtype to load the model in (default: its own)",
        "data",
        ACTIVATION_DTYPES,
        resume=REFUSE,
    )
    cache_dir: str | None = _opt(None, "activation cache folder (source=cache)", "data")
    synthetic_d: int = _opt(64, "width of synthetic activations", "data", resume=REFUSE)
    synthetic_features: int = _opt(
        256, "true features in the synthetic dictionary", "data", resume=REFUSE
    )
    synthetic_active: int = _opt(4, "true features active per synthetic row", "data", resume=REFUSE)
    synthetic_noise: float = _opt(
        0.02, "gaussian noise scale of synthetic rows", "data", resume=REFUSE
    )

    # --- the SAE -----------------------------------------------------------------------
    activation: str = _opt("topk", "SAE activation", "sae", ACTIVATIONS, resume=REFUSE)
    n_latents: int | None = _opt(
        None, "dictionary size m (default: expansion_factor * d_in)", "sae", resume=REFUSE
    )
    expansion_factor: int = _opt(16, "m / d_in when n_latents is not given", "sae", resume=REFUSE)
    k: int = _opt(
        32, "active latents per token (topk; batchtopk: mean per token)", "sae", resume=REFUSE
    )
    matryoshka: str | None = _opt(
        None,
        "Matryoshka prefix sizes, e.g. 1024,4096 (topk, batchtopk): each prefix of the "
        "dictionary learns to reconstruct on its own (the whole dictionary is the last)",
        "sae",
        resume=REFUSE,
    )
    clt: bool = _opt(
        False,
        "train a cross-layer transcoder over --layers (topk, batchtopk, relu, jumprelu): n_latents "
        "features per layer, each writing to its layer's output and every later one",
        "sae",
        resume=REFUSE,
    )
    skip_connection: bool = _opt(
        False,
        "a transcoder's linear skip connection: x_hat = decode(code) + W_skip x",
        "sae",
        resume=REFUSE,
    )
    dtype: str = _opt("float32", "parameter dtype", "sae", PARAMETER_DTYPES, resume=REFUSE)
    backend: str | None = _opt(
        None,
        "sparse-op backend (default: the best that runs on the inputs)",
        "sae",
        BACKENDS,
    )
    device: str = _opt("auto", "device to train on: auto (cuda if available), cpu, cuda", "sae")
    normalize_decoder: bool = _opt(
        True,
        "keep decoder rows at unit norm and drop each row's gradient component along it",
        "sae",
        resume=REFUSE,
    )
    b_dec_init: str = _opt(
        "geometric_median",
        "initial b_dec from the first batch",
        "sae",
        ("geometric_median", "mean", "zeros"),
        resume=REFUSE,
    )
    normalize_input: bool = _opt(
        True,
        "scale activations so their mean norm is sqrt(d_in) while training; the scale is "
        "folded into the saved SAE, which works on raw activations",
        "sae",
        resume=REFUSE,
    )
    init_tokens: int = _opt(
        4096,
        "activations drawn before training to set b_dec and the input scale",
        "sae",
        resume=REFUSE,
    )

    # --- optimisation --------------------------------------------------------------------
    steps: int = _opt(1000, "optimizer steps", "optim")
    batch_size: int = _opt(
        4096,
        "activations (tokens) per micro-batch, over all data-parallel processes",
        "optim",
        resume=REFUSE,
    )
    grad_accum: int = _opt(1, "micro-batches per optimizer step", "optim", resume=REFUSE)
    lr: float | None = _opt(
        None, "peak learning rate (default: 2e-4 / sqrt(m / 2**14), Gao et al. 2024)", "optim"
    )
    lr_warmup_steps: int | None = _opt(
        None, "linear warmup from 0 to lr (default: min(100, steps // 10))", "optim"
    )
    lr_decay: str = _opt(
        "linear", "decay to 0 after lr_decay_start", "optim", ("linear", "cosine", "none")
    )
    lr_decay_start: float = _opt(0.8, "fraction of the steps after which lr decays", "optim")
    adam_beta1: float = _opt(0.9, "Adam beta1", "optim")
    adam_beta2: float = _opt(0.999, "Adam beta2", "optim")
    adam_eps: float = _opt(6.25e-10, "Adam epsilon (Gao et al. 2024)", "optim")
    adam_moments: str = _opt(
        "param",
        "storage of Adam's two moments: the parameters' dtype, or bf16 (4 bytes less per fp32 "
        "parameter, still computed in fp32)",
        "optim",
        ADAM_MOMENTS,
    )
    grad_clip: float = _opt(0.0, "clip the gradient norm to this (0: no clipping)", "optim")
    autocast: str = _opt(
        "none", "mixed precision on GPU (fp16 adds loss scaling)", "optim", tuple(AUTOCAST_DTYPES)
    )
    seed: int = _opt(0, "seed of the SAE init and the data order", "optim", resume=REFUSE)

    # --- sparsity and dead latents -------------------------------------------------------
    k_aux: int | None = _opt(None, "AuxK latents (default: d_in // 2)", "sparsity")
    auxk_coef: float = _opt(1 / 32, "AuxK loss coefficient (topk, batchtopk; 0: off)", "sparsity")
    dead_tokens: int = _opt(
        10_000_000, "a latent is dead after this many tokens without firing", "sparsity"
    )
    dense_threshold: float = _opt(
        0.1, "a latent is dense when it fires on more than this fraction of tokens", "sparsity"
    )
    l1_coef: float = _opt(5.0, "L1 coefficient (relu, gated), times decoder norms", "sparsity")
    l0_coef: float = _opt(1.0, "L0 coefficient (jumprelu)", "sparsity")
    sparsity_warmup_steps: int = _opt(
        0, "linear warmup of the l1/l0 coefficient from 0", "sparsity"
    )
    jumprelu_bandwidth: float = _opt(
        1e-3, "JumpReLU straight-through bandwidth", "sparsity", resume=REFUSE
    )

    # --- distributed ---------------------------------------------------------------------
    latent_parallel: int = _opt(
        1,
        "processes that split the dictionary by latents (under torchrun; the other factor "
        "of the world size is data parallel, and batch_size is the global batch)",
        "parallel",
    )
    dist_timeout: float = _opt(
        600.0,
        "seconds a process waits for the others in a collective before the run fails",
        "parallel",
    )

    # --- output --------------------------------------------------------------------------
    out_dir: str = _opt("runs/sae", "run folder: checkpoints, final SAE, metrics, plots", "output")
    checkpoint_every: int = _opt(500, "steps between checkpoints (0: only at exit)", "output")
    keep_checkpoints: int = _opt(3, "checkpoints kept (the oldest are deleted)", "output")
    log_every: int = _opt(10, "steps between metric lines", "output")
    progress: bool = _opt(True, "show a progress bar", "output")
    plots: bool = _opt(True, "write training-curve and firing-frequency PNGs at the end", "output")
    tensorboard: bool = _opt(
        False, "also log the metrics to TensorBoard, in out_dir/tensorboard", "output"
    )
    wandb: bool = _opt(
        False,
        "also log the metrics to Weights & Biases (offline unless WANDB_MODE says otherwise)",
        "output",
    )
    wandb_project: str | None = _opt(
        None, "the wandb project (with --wandb; default: WANDB_PROJECT, else wandb's)", "output"
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first option with a bad value."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            kind, optional = field_type(f)
            if value is None and optional:
                continue
            if not _is_a(value, kind):
                raise ConfigError(f"{f.name} must be {kind.__name__}, got {value!r}")
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {list(choices)}, got {value!r}")
        positive = (
            "context_size",
            "model_batch_size",
            "shuffle_buffer",
            "synthetic_d",
            "synthetic_features",
            "synthetic_active",
            "expansion_factor",
            "k",
            "init_tokens",
            "steps",
            "batch_size",
            "grad_accum",
            "dead_tokens",
            "log_every",
            "keep_checkpoints",
            "n_latents",  # None (derived) is allowed for these two
            "k_aux",
            "latent_parallel",
        )
        for name in positive:  # the loop above has checked that each is an int (or None)
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        nonneg = ("checkpoint_every", "lr_warmup_steps", "sparsity_warmup_steps")
        for name in nonneg:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}")
        for name in ("auxk_coef", "l1_coef", "l0_coef", "grad_clip", "synthetic_noise"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("lr", "adam_eps", "jumprelu_bandwidth", "dist_timeout"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        check_device(self.device)
        if not 0 <= self.lr_decay_start <= 1:
            raise ConfigError(f"lr_decay_start must be in [0, 1], got {self.lr_decay_start!r}")
        if not 0 < self.dense_threshold <= 1:
            raise ConfigError(f"dense_threshold must be in (0, 1], got {self.dense_threshold!r}")
        if self.hooks is not None:
            if self.source != "model" or self.hook is not None:
                raise ConfigError("hooks replaces hook, and needs source=model")
            try:
                parse_hooks(self.hooks)
            except ValueError as e:
                raise ConfigError(f"hooks: {e}") from None
        if self.matryoshka is not None:  # again by the trainer, which knows d_in
            self.matryoshka_prefixes()
        if (self.hook_in is None) != (self.hook_out is None):
            raise ConfigError("a transcoder needs both hook_in and hook_out")
        if self.hook_in is not None:
            if self.source != "model" or self.hook is not None or self.hooks is not None:
                raise ConfigError("hook_in and hook_out replace hook, and need source=model")
            if self.hook_in == self.hook_out:
                raise ConfigError("hook_out must differ from hook_in")
        self._check_clt()
        self._check_crosscoder()
        if self.skip_connection and self.hook_in is None and not self.clt:
            raise ConfigError("skip_connection is a transcoder's: give hook_in and hook_out")
        hooked = self.hook or self.hooks or self.hook_in or self.layers
        if self.source == "model" and (not self.model or not hooked):
            raise ConfigError(
                "source=model needs both model and hook (or hooks, hook_in, or layers with clt)"
            )
        if self.source == "cache" and not self.cache_dir:
            raise ConfigError("source=cache needs cache_dir")
        if self.source == "synthetic" and self.synthetic_active > self.synthetic_features:
            raise ConfigError("synthetic_active must be <= synthetic_features")

    def _check_crosscoder(self) -> None:
        """ConfigError unless crosscoder and model_b describe a crosscoder's run."""
        if self.model_b is not None and not self.crosscoder:
            raise ConfigError("model_b is a crosscoder's second model: give crosscoder")
        if not self.crosscoder:
            return
        if self.source != "model":
            raise ConfigError("crosscoder reads source=model")
        if self.hook_in is not None or self.clt:
            raise ConfigError("crosscoder reads hook points: not with hook_in or clt")
        if self.model_b is None and len(self.crosscoder_hooks()) < 2:
            raise ConfigError(
                "crosscoder needs two sources or more: --hooks H1,H2,... of one model, or --model-b"
            )

    def crosscoder_hooks(self) -> list[str]:
        """The hook points a crosscoder reads (in each model, with model_b)."""
        if self.hooks is not None:
            return parse_hooks(self.hooks)
        return [self.hook] if self.hook else []

    def _check_clt(self) -> None:
        """ConfigError unless clt and layers describe a cross-layer transcoder's run."""
        if self.layers is not None and not self.clt:
            raise ConfigError("layers are a cross-layer transcoder's: give clt")
        if not self.clt:
            return
        if self.layers is None:
            raise ConfigError("clt needs layers, e.g. 0-5")
        try:
            clt_hooks(self.layers)
        except ValueError as e:
            raise ConfigError(f"layers: {e}") from None
        if self.source not in ("model", "synthetic"):
            raise ConfigError("clt reads source=model (or synthetic), not a cache")
        if self.hook or self.hooks or self.hook_in:
            raise ConfigError("clt reads the layers' mlp_in and mlp_out: give layers, not hooks")
        if self.activation not in CLT_ACTIVATIONS:
            raise ConfigError(
                f"clt: activation must be one of {list(CLT_ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.matryoshka is not None:
            raise ConfigError("clt: a cross-layer transcoder has no Matryoshka prefixes")

    def matryoshka_prefixes(self, n_latents: int | None = None) -> list[int] | None:
        """The prefix sizes matryoshka names for a dictionary of n_latents (None: the
        n_latents option, else the last size given), checked with the activation;
        ConfigError says what is wrong."""
        try:
            sizes = [integer(part) for part in self.matryoshka.split(",")]
        except ValueError:
            sizes = []  # parse_matryoshka says what is wrong
        m = n_latents or self.n_latents or (sizes[-1] if sizes else 1)
        try:
            prefixes = parse_matryoshka(self.matryoshka, m)
            check_matryoshka(prefixes or [m], m, self.activation)
        except ValueError as e:
            raise ConfigError(f"matryoshka: {e}") from None
        return prefixes

    def transcoder(self) -> bool:
        """Whether the run trains a transcoder (hook_in -> hook_out)."""
        return self.hook_in is not None

    def latents(self, d_in: int) -> int:
        """The dictionary size m for activations of width d_in."""
        return self.n_latents or self.expansion_factor * d_in

    def warmup_steps(self) -> int:
        """lr_warmup_steps, or by default 100 scaled down for short runs (a tenth of them)."""
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return min(100, self.steps // 10)

    def peak_lr(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(n_latents / 2**14)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> TrainConfig:
        """Build from a mapping of option names; unknown names raise ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {unknown}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a .json or .toml file of options, or a run's config.json (its "train"
        options); overrides win over the file."""
        path = Path(path)
        text = read_text(path, ConfigError)
        if path.suffix == ".toml":
            import tomllib

            try:
                values = tomllib.loads(text)
            except (ValueError, RecursionError) as e:
                raise ConfigError(f"config file {path} does not parse: {e}") from None
        else:
            values = parse_json(text, f"config file {path}", ConfigError)
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a table of options")
        if isinstance(values.get("train"), dict) and "source" in values:  # a run's config.json
            values = values["train"]
        return cls.from_dict({**values, **overrides}, where=str(path))
