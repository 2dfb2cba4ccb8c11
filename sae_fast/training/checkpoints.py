"""Training checkpoints: run_dir/checkpoints/step-00000100/ holding the SAE and the run's state.

Each folder holds the SAE as `sae/` would be at that step (sae.safetensors + cfg.json, input
scale folded in: any loader reads it as an SAE for raw activations) and train_state.pt
(optimizer, scheduler, step, latent counters, RNG states, data position, input scale, config,
and the training-time values of the few tensors folding changed, so resuming is exact). A
folder appears whole (files.atomic_folder) and old ones vanish whole (files.remove_folder),
so a crash leaves complete checkpoints and hidden scratch folders that the next run removes.

A distributed run's checkpoint holds the same, sharded by latents (parallel/row_shards.py): each
latent shard of data rank 0 writes its rows of the SAE (sae-0000i-of-0000L.safetensors, read
by every loader as one SAE) and of the training state (train_state-*.safetensors: the
optimizer's moments, the firing counters, the training-time biases), and rank 0 the rest of
train_state.pt. Either layout resumes in any other (CheckpointState), so a run can continue
on another number of processes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .. import checkpoint
from ..files import atomic_folder, atomic_path, remove_folder, save_torch
from ..parallel import row_shards
from ..parallel.layout import Layout, agree, shared_folder
from ..parallel.ops import shard_range
from .metrics import LatentStats

# A run folder: what the trainer writes, by the names every reader uses.
RUN_CONFIG_FILE = "config.json"  # options, source, input scale
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
SAE_DIR = "sae"  # the final SAE, for raw activations
STATE_FILE = "train_state.pt"
STATE_STEM = "train_state"  # a distributed run's row shards of the training state
# How train_state.pt says its checkpoint is laid out (the "layout" key; before it, a state
# without "optimizer" was a sharded one's).
SINGLE, SHARDED = "single", "row_shards"
WHOLE = ("b_dec", "W_skip")  # what every latent shard holds whole; the others have m rows
_NAME = re.compile(r"^step-([0-9]{8})$")


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def save(
    root: str | Path, step: int, write: Callable[[Path], None], state: dict, keep: int
) -> Path:
    """Write checkpoint `step` under root (write(folder) puts the model into it, then the
    state follows) and prune to the newest `keep`; returns its folder."""
    root = Path(root)
    final = root / folder_name(step)
    if final.exists():  # this step is already saved (periodic save, then exit)
        return final
    with atomic_folder(final) as tmp:
        write(tmp)
        with atomic_path(tmp / STATE_FILE) as path:
            save_torch({**state, "layout": SINGLE}, path)
    prune(root, keep)
    return final


def is_row(name: str, t: Tensor) -> bool:
    """Whether t has one row per latent (a latent shard holds its rows of it): a parameter or
    counter (W_enc), or a state name of one (param.b_dec, adam.W_enc.exp_avg, stats.total)."""
    parts = name.split(".")
    return parts[len(parts) > 1] not in WHOLE and t.ndim > 0


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest keep checkpoints under root."""
    for old in list_checkpoints(root)[:-keep]:
        remove_folder(old)


def write_shards(
    folder: Path, stem: str, rows: dict[str, Tensor], whole: dict[str, Tensor], layout: Layout
) -> None:
    """This rank's row_shards of a tensor set sharded by latents (data rank 0 writes; rank 0
    also the index, from the layout alone). rows: (m_r, ...) each; whole: the rest."""
    n_rows = layout_rows(rows, layout)
    splits = [shard_range(n_rows, i, layout.latent) for i in range(layout.latent)]
    if layout.data_rank == 0:
        offset = splits[layout.latent_rank][0]
        row_shards.write_shard(folder, stem, rows, whole, layout.latent_rank, layout.latent, offset)
    if layout.main:
        row_shards.write_index(folder, stem, n_rows, list(rows), list(whole), splits)


def layout_rows(rows: dict[str, Tensor], layout: Layout) -> int:
    """The whole count of latents of which this rank holds rows (the shards are equal)."""
    return next(iter(rows.values())).shape[0] * layout.latent


def save_sharded_sae(folder: Path, config: dict, rows: dict, whole: dict, layout: Layout) -> None:
    """An SAE sharded by latents, written by its ranks as one sae_fast folder."""
    with shared_folder(folder, layout, checkpoint.FILES) as tmp:
        write_shards(tmp, checkpoint.SHARD_STEM, rows, whole, layout)
        if layout.main:
            checkpoint.write_config(tmp, config)


def save_sharded(
    root: Path,
    step: int,
    sae: tuple[dict, dict, dict],
    state_tensors: tuple[dict, dict],
    state: dict,
    keep: int,
    layout: Layout,
) -> Path:
    """Checkpoint `step` of a distributed run, written by all its ranks (see the module
    docstring); sae: (config, rows, whole), state_tensors: (rows, whole) of the state."""
    final = root / folder_name(step)
    if agree(final.exists(), layout):  # rank 0's view: another machine's may lag behind
        return final
    config, rows, whole = sae
    with shared_folder(final, layout) as tmp:
        write_shards(tmp, checkpoint.SHARD_STEM, rows, whole, layout)
        write_shards(tmp, STATE_STEM, *state_tensors, layout)
        if layout.main:
            with atomic_path(tmp / STATE_FILE) as path:
                save_torch({**state, "layout": SHARDED}, path)
            checkpoint.write_config(tmp, config)
    if layout.main:
        prune(root, keep)
    return final


def read_state(folder: Path, device: torch.device | str) -> dict:
    """The train_state.pt of checkpoint folder, on device; CheckpointError if it is missing
    or damaged."""
    if not (folder / STATE_FILE).is_file():
        raise checkpoint.CheckpointError(f"{folder} is not a training checkpoint (no {STATE_FILE})")
    try:
        state = torch.load(folder / STATE_FILE, map_location=device, weights_only=True)
    except Exception as e:  # a damaged file raises many kinds of errors
        raise checkpoint.CheckpointError(f"{folder / STATE_FILE} cannot be read: {e!r}") from e
    if not isinstance(state, dict):
        raise checkpoint.CheckpointError(f"{folder / STATE_FILE} is not a training state")
    return state


class CheckpointState:
    """A checkpoint of either layout, read as named tensors, rows by rows.

    config: the SAE's; state: train_state.pt's dict. Tensor names: "param.NAME" (the
    training-time parameters and buffers), "adam.NAME.KEY" (the optimizer's state of
    parameter NAME), "stats.KEY" (the firing counters). read(name, offset, size) gives the
    latents [offset, offset + size) of a tensor with one row per latent, the others whole.
    """

    def __init__(
        self, folder: str | Path, device: torch.device | str, param_names: list[str]
    ) -> None:
        folder = Path(folder)
        self.folder, self.device = folder, device
        self.state = read_state(folder, device)
        layout = self.state.get("layout", SINGLE if "optimizer" in self.state else SHARDED)
        if layout not in (SINGLE, SHARDED):
            raise checkpoint.CheckpointError(f"{folder / STATE_FILE}: unknown layout {layout!r}")
        # What the state declares, not what files happen to be there: a sharded checkpoint
        # whose index is missing is damaged, not a one-process one.
        self.sharded = layout == SHARDED
        if self.sharded:
            self.config = checkpoint.read_config(folder)
            self._sae = row_shards.RowShards(
                folder, checkpoint.SHARD_STEM, checkpoint.CheckpointError
            )
            self._train = row_shards.RowShards(folder, STATE_STEM, checkpoint.CheckpointError)
        else:
            self.config, self._sae_tensors = checkpoint.read(folder, device=device)
            self._param_names = param_names

    @functools.cached_property
    def _tensors(self) -> dict[str, Tensor]:
        """One process's train_state.pt as the names above, laid out on first use: after the
        resume has compared the options that shaped the SAE. (Before train_tensors existed,
        a checkpoint's SAE was the training-time one.)"""
        tensors = {**self._sae_tensors, **self.state.get("train_tensors", {})}
        named = {f"param.{k}": v for k, v in tensors.items()}
        optimizer = self.state["optimizer"]
        order = [i for group in optimizer["param_groups"] for i in group["params"]]
        if len(order) != len(self._param_names):
            raise checkpoint.CheckpointError(
                f"{self.folder / STATE_FILE} holds the optimizer state of {len(order)} "
                f"parameters; this SAE has {len(self._param_names)}"
            )
        for i, name in zip(order, self._param_names, strict=True):
            for key, value in optimizer["state"].get(i, {}).items():
                named[f"adam.{name}.{key}"] = value
        for key in LatentStats.COUNTERS:
            named[f"stats.{key}"] = self.state["stats"][key]
        return named

    def _find(self, name: str) -> tuple[row_shards.RowShards, str]:
        kind, _, rest = name.partition(".")
        if kind == "param" and name not in self._train.names:
            return self._sae, rest
        return self._train, name

    def names(self) -> set[str]:
        """The names of the tensors the checkpoint holds."""
        if not self.sharded:
            return set(self._tensors)
        return {f"param.{n}" for n in self._sae.names} | set(self._train.names)

    def read(self, name: str, offset: int, size: int) -> Tensor:
        """Tensor name: its rows [offset, offset + size) if it has one per latent, else whole."""
        if not self.sharded:
            t = self._tensors[name]
            return t[offset : offset + size] if is_row(name, t) else t
        shards, key = self._find(name)
        if key in shards.row_names:
            return shards.rows(key, offset, size, self.device)
        return shards.whole(key, self.device)
