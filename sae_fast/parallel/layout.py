"""The 2-D layout of a distributed run: data-parallel x latent-parallel process groups.

P processes (torchrun's WORLD_SIZE) form D = P / L data-parallel ranks of L latent shards:
rank r is latent shard r % L of data rank r // L. A latent group (the L ranks of one data
rank, consecutive: one machine's GPUs) holds one whole SAE, its latents split in contiguous
blocks, and trains on one slice of the global batch; a data group (the D ranks holding the
same latents) averages their gradients. One process is the layout D = L = 1, with no groups.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..files import atomic_folder
from ..training.config import ConfigError, TrainConfig
from .ops import shard_range

# torchrun sets these in every process it starts.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedRunError(RuntimeError):
    """Another process of the run stopped, or a collective waited past dist_timeout."""


def is_collective_failure(error: BaseException) -> bool:
    """Whether error is a collective's failure (a lost peer, a timeout), not a bug here."""
    first = str(error).strip().split("\n")[0]
    return isinstance(error, dist.DistError) or any(
        word in first for word in ("gloo", "NCCL", "Connection reset", "Timed out")
    )


@dataclass
class Layout:
    """This process's place in the run: rank of world; data_rank of data, latent_rank of
    latent; the groups it belongs to (None for a single process)."""

    world: int = 1
    rank: int = 0
    latent: int = 1
    data_group: dist.ProcessGroup | None = field(default=None, repr=False)
    latent_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def data(self) -> int:
        return self.world // self.latent

    @property
    def data_rank(self) -> int:
        return self.rank // self.latent

    @property
    def latent_rank(self) -> int:
        return self.rank % self.latent

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, plots and writes the run's own files."""
        return self.rank == 0

    def latents(self, n_latents: int) -> tuple[int, int]:
        """(offset, size) of this rank's block of the n_latents latents."""
        return shard_range(n_latents, self.latent_rank, self.latent)

    def describe(self) -> dict:
        """The layout as run configs and provenance record it."""
        return {"world": self.world, "data_parallel": self.data, "latent_parallel": self.latent}


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its env)."""
    return all(name in os.environ for name in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def local_device(name: str) -> str:
    """The device option for this process: under a launcher, 'auto' and 'cuda' become the
    GPU of its LOCAL_RANK."""
    if launched() and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return name


def init_layout(cfg: TrainConfig, device: torch.device) -> Layout:
    """Join the run torchrun started (NCCL on CUDA, gloo on CPU) and build the layout that
    cfg.latent_parallel asks of its processes; without a launcher, one process."""
    if not launched():
        if cfg.latent_parallel != 1:
            raise ConfigError(
                f"latent_parallel={cfg.latent_parallel} needs that many processes: launch with "
                f"torchrun --nproc-per-node {cfg.latent_parallel} -m sae_fast train ..."
            )
        return Layout()
    world = int(os.environ["WORLD_SIZE"])
    if world % cfg.latent_parallel:
        raise ConfigError(
            f"latent_parallel={cfg.latent_parallel} does not divide the {world} processes"
        )
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=cfg.dist_timeout),
            device_id=device if device.type == "cuda" else None,
        )
    rank, latent = dist.get_rank(), cfg.latent_parallel
    data = world // latent
    # Every process creates every group, in the same order (torch.distributed's rule).
    data_groups = [dist.new_group(list(range(j, world, latent))) for j in range(latent)]
    latent_groups = [dist.new_group(list(range(i * latent, (i + 1) * latent))) for i in range(data)]
    # Groups of one process stay None: nothing to reduce (and None never means the world).
    data_group = data_groups[rank % latent] if data > 1 else None
    latent_group = latent_groups[rank // latent] if latent > 1 else None
    return Layout(world, rank, latent, data_group, latent_group)


def close_layout(layout: Layout, finished: bool = True) -> None:
    """Leave the process group (the end of a distributed run). finished: every rank got here
    without an error, so they wait for each other first: a rank that tears its groups down
    while a peer still sends to it can abort either process."""
    if layout.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """t summed over group, in place (t itself without a group)."""
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def agree(value: Any, layout: Layout) -> Any:
    """Rank 0's value on every rank (a decision every rank must take alike)."""
    if not layout.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_first(
    x: Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    group: dist.ProcessGroup | None,
) -> Tensor:
    """x of group's first rank (the world's rank 0 for None) on every rank of group; the
    others pass None and the shape and dtype to receive."""
    if x is None:
        x = torch.empty(shape, dtype=dtype, device=device)
    source = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(x, src=source, group=group)
    return x


class PeerRows:
    """The source of a latent shard that does not draw (sources' broadcast_rows): its
    group's first shard runs the model and sends the rows, so this process loads no model.
    It knows the stream's widths (its hook points', which rows hold side by side) and
    description, and keeps no position of its own."""

    broadcast_rows = True

    def __init__(self, widths: tuple[int, ...], described: dict) -> None:
        self.widths, self.d_in, self.described = tuple(widths), sum(widths), described

    def next_batch(self, n: int, part: tuple[int, int] = (0, 1)) -> Tensor:
        raise RuntimeError("a latent shard other than the first receives its rows")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        return self.described


def share_source(build: Callable[[], Any], layout: Layout) -> Any:
    """The source build() makes, on the first shard of each latent group; a PeerRows of the
    same width and description on the others. An error building it stops the whole group."""
    if layout.latent_group is None:
        return build()
    first = dist.get_global_rank(layout.latent_group, 0)
    source, box = None, [None]
    if layout.latent_rank == 0:
        try:
            source = build()
        finally:  # on an error, None tells the others to stop too
            widths = getattr(source, "widths", (source.d_in,)) if source is not None else None
            box = [(widths, source.describe())] if source is not None else [None]
            dist.broadcast_object_list(box, src=first, group=layout.latent_group)
        return source
    dist.broadcast_object_list(box, src=first, group=layout.latent_group)
    if box[0] is None:
        raise ConfigError(
            f"rank {first}, the first shard of this latent group, could not build the "
            "activation source (its error says why)"
        )
    return PeerRows(*box[0])


def build_rank_source(cfg: TrainConfig, device: torch.device, layout: Layout) -> Any:
    """This rank's activation source of the run cfg describes: its data rank's part of the
    data, and for a model (whose rows are broadcast) the model on each latent group's first
    shard alone."""
    from ..sources import build_source

    def build() -> Any:
        return build_source(cfg, device, part=(layout.data_rank, layout.data))

    return share_source(build, layout) if cfg.source == "model" else build()


@contextmanager
def shared_folder(
    target: Path, layout: Layout, replaceable: tuple[str, ...] = ()
) -> Iterator[Path]:
    """files.atomic_folder for every rank of the run: rank 0 makes the scratch folder and
    swaps it in once each rank has written its files into it. On several machines the
    folder must be on a filesystem they all see."""
    if not layout.distributed:
        with atomic_folder(target, replaceable) as tmp:
            yield tmp
        return
    if layout.main:
        try:
            scope = atomic_folder(target, replaceable)
            tmp = scope.__enter__()
        except BaseException:
            dist.broadcast_object_list([None], src=0)  # the others stop too
            raise
        dist.broadcast_object_list([str(tmp)], src=0)
        try:
            yield tmp
            dist.barrier()  # every rank's files are in
        except BaseException as e:
            scope.__exit__(type(e), e, e.__traceback__)
            raise
        scope.__exit__(None, None, None)
    else:
        found = [None]
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            raise DistributedRunError(f"rank 0 could not start writing {target} (its error)")
        yield Path(found[0])
        dist.barrier()
    dist.barrier()  # swapped in: no rank reads the folder before it is whole
