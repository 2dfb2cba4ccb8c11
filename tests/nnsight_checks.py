"""The nnsight checks, run by test_integration_nnsight.py as a script of its own: nnsight needs
its traces in a source file, and importing it patches every object (a `save` attribute) and
Tensor.backward, which must not leak into the other tests' process.

Oracle: analysis.steering's attach/steer on the same Hugging Face model (torch forward hooks,
no nnsight). Prints one line per check passed.
"""

from __future__ import annotations

import nnsight
import torch
from models import WIDTH, tiny_causal_lm

from sae_fast import SparseAutoencoder, SparseCode
from sae_fast.analysis.steering import FeatureEdits, attach, steer
from sae_fast.integrations.nnsight import splice
from sae_fast.sources import capture

TOL = {"atol": 1e-5, "rtol": 1e-5}
IDS = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2023, 2003, 2178, 2028, 2, 9]])


def make_sae(**kw) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(WIDTH, 128, k=4, **kw)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    return sae


def main() -> None:
    hf = tiny_causal_lm()[0]
    model = nnsight.NNsight(hf)
    sae = make_sae()
    clean = hf(IDS).logits

    with attach(hf, "transformer.h.1", sae) as site:
        want = hf(IDS).logits
    with torch.no_grad(), model.trace(IDS):
        ours = nnsight.save(splice(model.transformer.h[1], sae))
        got = model.lm_head.output.save()
    torch.testing.assert_close(got, want, **TOL)
    assert isinstance(ours.code, SparseCode) and ours.code.values.shape == (2, 7, 4)
    torch.testing.assert_close(ours.code.values, site.code.values, **TOL)
    assert not torch.allclose(got, clean, atol=1e-3)
    print("reconstruct: the logits of attach, the code sparse")

    with torch.no_grad(), model.trace(IDS):
        kept = nnsight.save(splice(model.transformer.h[1], sae, add_error=True))
        got = model.lm_head.output.save()
    torch.testing.assert_close(got, clean, atol=0, rtol=0)
    with capture(hf, "transformer.h.1") as held:
        hf(IDS)
    torch.testing.assert_close(kept.code.values, sae.encode(held.output).values, **TOL)
    print("error term: the model's logits, the code of its activations")

    latent = int(kept.code.indices[0, 0, 0])
    with steer(hf, "transformer.h.1", sae, clamp={latent: 5.0}):
        want = hf(IDS).logits
    with torch.no_grad(), model.trace(IDS):
        splice(model.transformer.h[1], sae, add_error=True, edits=FeatureEdits(clamp={latent: 5.0}))
        got = model.lm_head.output.save()
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, clean, atol=1e-4)
    print("steer: the logits of steer")

    tc = make_sae(transcoder=True, d_out=WIDTH)
    with attach(hf, "transformer.h.0.mlp", tc, hook_in="transformer.h.0.ln_2"):
        want = hf(IDS).logits
    with torch.no_grad(), model.trace(IDS):
        splice(model.transformer.h[0].mlp, tc, read=model.transformer.h[0].ln_2)
        got = model.lm_head.output.save()
    torch.testing.assert_close(got, want, **TOL)
    print("transcoder: reads ln_2, replaces the MLP's output")


if __name__ == "__main__":
    main()
