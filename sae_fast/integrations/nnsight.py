"""nnsight: a sae_fast SAE or transcoder spliced into a module's output inside a trace.

    model = nnsight.NNsight(hf_model)
    with model.trace(input_ids):
        site = nnsight.save(splice(model.transformer.h[1], sae))           # reconstruct
        logits = model.lm_head.output.save()
    site.code                                                             # SparseCode (b, s, k)
    with model.trace(input_ids):
        splice(model.transformer.h[1], sae, add_error=True,
               edits=FeatureEdits(clamp={12: 5.0}))                       # steer one feature

The splice is analysis.steering's SAESite: with add_error=True and no edits the model's
outputs are unchanged and site.code is the sparse code of the module's output, which is never
a dense (tokens, latents) tensor.
"""

from __future__ import annotations

from typing import Any

from ..analysis.steering import FeatureEdits, SAESite, check_site
from ..sae import SparseAutoencoder, eval_mode
from ..sources.hooks import Captured, first_output, replace_first


def splice(
    envoy: Any,
    sae: SparseAutoencoder,
    *,
    add_error: bool = False,
    edits: FeatureEdits | None = None,
    read: Any = None,
) -> SAESite:
    """Inside ``model.trace(...)``: replace envoy's output (its first element if a tuple) by the
    SAE's output; returns the SAESite, whose code is this forward's code (``nnsight.save`` it
    to keep it after the trace, as any value made inside one).

    add_error=True adds the reconstruction error back; edits clamp, scale or zero latents. A
    transcoder reads the output of the envoy read and its prediction replaces envoy's output.
    The SAE runs in eval mode for the call.
    """
    check_site(sae, read)
    captured = None
    if read is not None:
        captured = Captured()
        captured.record(read.output)
    where = str(getattr(envoy, "path", envoy))
    site = SAESite(where, sae, add_error, edits, captured)
    output = envoy.output
    with eval_mode(sae):
        envoy.output = replace_first(output, site(first_output(output)), where)
    return site
