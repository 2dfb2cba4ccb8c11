"""TransformerLens: a sae_fast SAE or transcoder spliced in at a HookedTransformer hook point.

    with attach(model, "blocks.1.hook_resid_post", sae) as site:       # reconstruct
        logits = model(tokens)
    site.code                                                            # SparseCode (b, s, k)
    with attach(model, "blocks.1.hook_resid_post", sae, add_error=True,
                edits=FeatureEdits(clamp={12: 5.0})):                    # steer one feature
        logits = model(tokens)
    logits, codes = run_with_sparse_cache(model, tokens, saes={"blocks.1.hook_resid_post": sae})

The splice is analysis.steering's SAESite, through TransformerLens's own hooks (``model.hooks``),
so ``run_with_hooks`` and ``run_with_cache`` go on working inside the block. A TopK code stays
sparse: ``site.code`` holds (values, indices), never a dense (tokens, latents) tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import Tensor

from ..analysis.steering import FeatureEdits, SAESite, check_site
from ..ops import SparseCode
from ..sae import SparseAutoencoder, eval_mode
from ..sources.hooks import Captured, HookPointError


def _hook_point(model: Any, name: str, arg: str) -> str:
    """name, checked to be one of model's hook points (argument arg)."""
    if name not in model.hook_dict:
        near = [h for h in model.hook_dict if h.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
        known = near[:8] or list(model.hook_dict)[:8]
        raise HookPointError(
            f"{arg} {name!r} is not a hook point of this model; for example: {', '.join(known)}"
        )
    return name


@contextmanager
def attach(
    model: Any,
    hook_name: str,
    sae: SparseAutoencoder,
    *,
    add_error: bool = False,
    edits: FeatureEdits | None = None,
    hook_in: str | None = None,
) -> Iterator[SAESite]:
    """Route the HookedTransformer's hook_name activations (..., d) through sae inside the
    with-block; yields the SAESite (its code: the last forward's).

    add_error=True adds the reconstruction error back (the model's outputs are unchanged but
    for the edits); edits (FeatureEdits) clamp, scale or zero chosen latents. A transcoder reads
    hook_in and its prediction replaces hook_name. The SAE runs in eval mode; its mode and the
    model's hooks are restored on exit.
    """
    check_site(sae, hook_in)
    _hook_point(model, hook_name, "hook_name")
    read = None
    hooks = []
    if hook_in is not None:
        read = Captured()
        hooks.append((_hook_point(model, hook_in, "hook_in"), lambda act, hook: read.record(act)))
    site = SAESite(hook_name, sae, add_error, edits, read)
    hooks.append((hook_name, lambda act, hook: site(act)))
    with ExitStack() as stack:
        stack.enter_context(eval_mode(sae))
        stack.enter_context(model.hooks(fwd_hooks=hooks))
        yield site


def run_with_sparse_cache(
    model: Any,
    *model_args: Any,
    saes: Mapping[str, SparseAutoencoder],
    **model_kwargs: Any,
) -> tuple[Any, dict[str, SparseCode | Tensor]]:
    """model(*model_args, **model_kwargs) with each SAE reading its hook point (the outputs
    unchanged) -> (output, {hook_name: the code}): a SparseCode (..., k) for TopK SAEs."""
    with ExitStack() as stack:
        sites = {
            name: stack.enter_context(attach(model, name, sae, add_error=True))
            for name, sae in saes.items()
        }
        output = model(*model_args, **model_kwargs)
    return output, {name: site.code for name, site in sites.items()}
