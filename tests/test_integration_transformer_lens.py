"""A sae_fast SAE and transcoder spliced into a tiny random HookedTransformer through
TransformerLens's hooks.

Oracles from TransformerLens alone: the clean model's cache, and the rest of the model run
from a hand-made residual stream (``start_at_layer``) or with a hand-made MLP output.
"""

from __future__ import annotations

import pytest
import torch
from integrations import require
from models import WIDTH, tiny_causal_lm, tiny_hooked_transformer

require("transformer_lens", load=False)

from sae_fast import SparseAutoencoder, SparseCode  # noqa: E402
from sae_fast.analysis.steering import FeatureEdits  # noqa: E402
from sae_fast.integrations.transformer_lens import attach, run_with_sparse_cache  # noqa: E402
from sae_fast.sources import HookPointError  # noqa: E402

HOOK = "blocks.0.hook_resid_post"
TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def model():
    return tiny_hooked_transformer()


def make_sae(**kw) -> SparseAutoencoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sae = SparseAutoencoder(WIDTH, 128, k=4, **kw)
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.1)
            if kw.get("skip_connection"):
                sae.W_skip.normal_(0, 0.1)
    return sae


def resid(model) -> torch.Tensor:
    return model.run_with_cache(TOKENS)[1][HOOK]


def test_reconstruction_replaces_the_hook_point_and_keeps_the_code_sparse(model):
    sae = make_sae()
    h = resid(model)
    want = model(sae(h).x_hat, start_at_layer=1)
    with attach(model, HOOK, sae) as site:
        got = model(TOKENS)
    torch.testing.assert_close(got, want, **TOL)
    assert isinstance(site.code, SparseCode) and site.code.values.shape == (2, 12, 4)
    torch.testing.assert_close(site.code.to_dense(128), sae.encode(h).to_dense(128), **TOL)
    assert not model.hook_dict[HOOK].fwd_hooks, "the hook is removed on exit"
    assert not torch.allclose(got, model(TOKENS), atol=1e-3)


def test_error_term_keeps_the_outputs_and_an_edit_steers_one_feature(model):
    sae = make_sae()
    clean = model(TOKENS)
    with attach(model, HOOK, sae, add_error=True):
        torch.testing.assert_close(model(TOKENS), clean, atol=0, rtol=0)
    h = resid(model)
    latent = int(sae.encode(h).indices[0, 0, 0])
    old = sae.encode(h).to_dense(128)[..., latent]
    steered = h + (5.0 - old)[..., None] * sae.W_dec[latent]
    with attach(model, HOOK, sae, add_error=True, edits=FeatureEdits(clamp={latent: 5.0})):
        got = model(TOKENS)
    torch.testing.assert_close(got, model(steered.detach(), start_at_layer=1), **TOL)


def test_a_transcoder_reads_one_hook_point_and_replaces_another(model):
    tc = make_sae(transcoder=True, d_out=WIDTH, skip_connection=True)
    hook_in, hook_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    read = model.run_with_cache(TOKENS)[1][hook_in]
    prediction = tc(read).x_hat.detach()
    want = model.run_with_hooks(TOKENS, fwd_hooks=[(hook_out, lambda act, hook: prediction)])
    with attach(model, hook_out, tc, hook_in=hook_in) as site:
        got = model(TOKENS)
    torch.testing.assert_close(got, want, **TOL)
    assert isinstance(site.code, SparseCode)


def test_run_with_sparse_cache_reads_several_hook_points(model):
    saes = {HOOK: make_sae(), "blocks.1.hook_resid_post": make_sae()}
    logits, codes = run_with_sparse_cache(model, TOKENS, saes=saes)
    torch.testing.assert_close(logits, model(TOKENS), atol=0, rtol=0)
    _, cache = model.run_with_cache(TOKENS)
    for name, code in codes.items():
        assert isinstance(code, SparseCode)
        torch.testing.assert_close(code.values, saes[name].encode(cache[name]).values, **TOL)


def test_a_wrong_hook_name_is_named(model):
    cases = [
        (HookPointError, "hook_name 'blocks.9.hook_resid_post' is not", "blocks.9.hook_resid_post",
         make_sae(), None),
        (HookPointError, "hook_in 'nowhere' is not", HOOK,
         make_sae(transcoder=True, d_out=WIDTH), "nowhere"),
        (ValueError, "hook_in is a transcoder's", HOOK, make_sae(), HOOK),
    ]  # fmt: skip
    for error, message, hook, sae, hook_in in cases:
        with pytest.raises(error, match=message), attach(model, hook, sae, hook_in=hook_in):
            pass


def test_transformer_bridge_splices_as_the_plain_model_does():
    """TransformerLens 3's TransformerBridge (over a transformers model) takes the same splice;
    the oracle is analysis.steering's attach on the wrapped model itself."""
    from transformer_lens.model_bridge import TransformerBridge

    from sae_fast.analysis.steering import attach as attach_hf

    hf, tokenizer = tiny_causal_lm()
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tokenizer)
    sae = make_sae()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with attach_hf(hf, "transformer.h.0", sae):
        want = hf(ids).logits
    with attach(bridge, "blocks.0.hook_resid_post", sae) as site:
        got = bridge(ids)
    torch.testing.assert_close(got, want, **TOL)
    assert isinstance(site.code, SparseCode) and site.code.values.shape == (1, 7, 4)
    logits, codes = run_with_sparse_cache(bridge, ids, saes={"blocks.0.hook_resid_post": sae})
    torch.testing.assert_close(logits, hf(ids).logits, atol=0, rtol=0)
    torch.testing.assert_close(codes["blocks.0.hook_resid_post"].values, site.code.values)
