"""Activation sources for SAE training: synthetic data, model activations, on-disk caches.

Every source implements ActivationSource: next_batch(n) -> (n, d_in), state_dict(),
load_state_dict(state) (exact resume) and describe(); build_source makes the one a run's data
options name. transformers is needed only to load models.
"""

from .base import ActivationSource, ShuffleBuffer, SourceError
from .cache import CacheSource, cache_from_model, read_manifest, write_cache
from .factory import DataOptions, build_source
from .hooks import (
    MINILM,
    HookPointError,
    capture,
    hook_module_path,
    hook_points,
    is_causal_lm,
    load_model,
    minilm_path,
    model_device,
    model_location,
    probe_hook,
    probe_hooks,
    resolve_hook,
    run_to_hook,
    run_to_hooks,
    splice,
)
from .model import (
    ModelSource,
    model_activations,
    model_description,
    pad_windows,
    special_tokens,
    token_windows,
)
from .stacked import stacked_activations
from .streams import HookStream, hook_streams
from .synthetic import HELD_OUT_STREAM, SyntheticCLTSource, SyntheticSource, feature_recovery
from .text import documents, split_documents, stdlib_docstrings, text_file

__all__ = [
    "HELD_OUT_STREAM",
    "MINILM",
    "ActivationSource",
    "CacheSource",
    "DataOptions",
    "HookPointError",
    "HookStream",
    "ModelSource",
    "ShuffleBuffer",
    "SourceError",
    "SyntheticCLTSource",
    "SyntheticSource",
    "build_source",
    "cache_from_model",
    "capture",
    "documents",
    "feature_recovery",
    "hook_module_path",
    "hook_points",
    "hook_streams",
    "is_causal_lm",
    "load_model",
    "minilm_path",
    "model_activations",
    "model_description",
    "model_device",
    "model_location",
    "pad_windows",
    "probe_hook",
    "probe_hooks",
    "read_manifest",
    "resolve_hook",
    "run_to_hook",
    "run_to_hooks",
    "special_tokens",
    "splice",
    "split_documents",
    "stacked_activations",
    "stdlib_docstrings",
    "text_file",
    "token_windows",
    "write_cache",
]
