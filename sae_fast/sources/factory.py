"""The activation source that a run's data options describe (source=model, cache, synthetic)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ..options import clt_hooks, parse_hooks
from ..validation import parse_dtype
from .base import ActivationSource
from .cache import CacheSource
from .hooks import HookPointError, load_model
from .model import ModelSource
from .synthetic import HELD_OUT_STREAM, SyntheticCLTSource, SyntheticSource


class DataOptions(Protocol):
    """The data options of a run, by the names TrainConfig gives them (its "data" group)."""

    source: str
    model: str | None
    hook: str | None
    hooks: str | None
    hook_in: str | None
    hook_out: str | None
    crosscoder: bool
    model_b: str | None
    clt: bool
    layers: str | None
    text: str
    context_size: int
    model_batch_size: int
    shuffle_buffer: int
    model_dtype: str | None
    cache_dir: str | None
    synthetic_d: int
    synthetic_features: int
    synthetic_active: int
    synthetic_noise: float
    seed: int


def build_source(
    options: DataOptions,
    device: torch.device | str,
    held_out: bool = False,
    part: tuple[int, int] = (0, 1),
) -> ActivationSource:
    """The activation source options describe, producing on device.

    held_out: synthetic rows other than the training run's, over the same dictionary.
    part: (data rank, data-parallel ranks) of a distributed run: a model source reads that
    share of the documents (the others share one stream, ActivationSource).
    """
    if options.source == "synthetic":
        shape = (options.synthetic_d, options.synthetic_features, options.synthetic_active)
        seeds = {
            "seed": options.seed,
            "stream_seed": options.seed + HELD_OUT_STREAM if held_out else None,
        }
        if options.clt:
            n_layers = len(clt_hooks(options.layers)[0])
            return SyntheticCLTSource(n_layers, *shape, options.synthetic_noise, **seeds)
        return SyntheticSource(*shape, options.synthetic_noise, **seeds)
    if options.source == "cache":
        return CacheSource(options.cache_dir, seed=options.seed, device=device)
    dtype = parse_dtype(options.model_dtype) if options.model_dtype else None
    model, tokenizer = load_model(options.model, device, dtype)
    model_b = load_model(options.model_b, device, dtype) if options.model_b else None
    return model_source(options, model, tokenizer, device, part, model_b)


def model_source(
    options: DataOptions,
    model: nn.Module,
    tokenizer: Any,
    device: torch.device | str,
    part: tuple[int, int] = (0, 1),
    model_b: tuple[nn.Module, Any] | None = None,
) -> ModelSource:
    """The ModelSource options describe, over a model already loaded (several texts through
    one model load it once); with hooks, on all of them (sources.hook_streams splits it); a
    transcoder's on (hook_in, hook_out), its rows the two side by side; a cross-layer
    transcoder's on every layer's mlp_in, then every layer's mlp_out; a crosscoder's on its
    hook points (in model, then in model_b: (model, tokenizer) loaded)."""
    if options.clt:
        hook = [name for group in clt_hooks(options.layers) for name in group]
    elif options.hooks:
        hook = parse_hooks(options.hooks)
    elif options.hook_in is not None:
        hook = [options.hook_in, options.hook_out]
    else:
        hook = options.hook
    try:
        return ModelSource(
            model,
            tokenizer,
            hook,
            options.text,
            context_size=options.context_size,
            batch_size=options.model_batch_size,
            shuffle_buffer=options.shuffle_buffer,
            seed=options.seed,
            device=device,
            part=part,
            model_b=model_b,
        )
    except HookPointError as e:
        if not options.clt:
            raise
        raise HookPointError(f"layers {options.layers}: {e}") from None
