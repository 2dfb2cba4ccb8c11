"""attach/steer on a tiny GPT-2: the SAE spliced in, its latents read, features edited.

Oracles: the clean model, a manual splice of the SAE's reconstruction, and the edits done on
dense latents (edited = z with the chosen entries changed; out = decode(edited) plus the error).
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from models import WIDTH, tiny_causal_lm

from sae_fast import SparseAutoencoder, SparseCode
from sae_fast.analysis.steering import FeatureEdits, SAESite, attach, steer
from sae_fast.sources import HookPointError, capture, resolve_hook, splice

N_LATENTS = 64
HOOK = "resid_post.1"
IDS = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2023, 2003, 2178, 2028, 2, 9]])


@pytest.fixture(scope="module")
def gpt2():
    return tiny_causal_lm()[0]


def make_sae(kind: str = "topk", dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        if kind == "relu":
            return SparseAutoencoder(WIDTH, N_LATENTS, activation="relu", dtype=dtype)
        norm = "layer_norm" if kind == "topk_layer_norm" else "none"
        return SparseAutoencoder(WIDTH, N_LATENTS, k=8, dtype=dtype, input_norm=norm)


def dense(code: SparseCode | torch.Tensor) -> torch.Tensor:
    return code.to_dense(N_LATENTS) if isinstance(code, SparseCode) else code


def hooked(model, hook, context, ids=IDS):
    """(activation at hook before the context's splice, after it, logits) of one forward."""
    with torch.no_grad(), ExitStack() as stack:
        before = stack.enter_context(capture(model, hook))
        site = stack.enter_context(context)
        after = stack.enter_context(capture(model, hook))
        logits = model(ids).logits
    return before.output, after.output, logits, site


def clean_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def dense_oracle(sae, x, edit, add_error):
    """The spliced output from dense latents: edit(z) decoded, plus x - x_hat if add_error."""
    x = x.to(sae.W_dec.dtype)
    # input_norm: forward maps the normalised-space reconstruction back by x_hat * scale + shift
    # (test_without_the_error_the_output_is_the_reconstruction ties this to forward).
    _, stats = sae.normalize_input(x)
    scale, shift = stats if stats is not None else (torch.ones(()), torch.zeros(()))
    z = dense(sae.encode(x))
    edited = edit(z.clone())
    decoded = sae.decode(edited) * scale + shift
    return decoded + (x - (sae.decode(z) * scale + shift)) if add_error else decoded


@pytest.mark.parametrize("kind", ["topk", "relu"])
@pytest.mark.parametrize("hook", ["resid_post.1", "attn_out.0", "mlp_out.1"])
def test_error_added_back_keeps_the_logits(gpt2, kind, hook):
    sae = make_sae(kind)
    x, out, logits, site = hooked(gpt2, hook, attach(gpt2, hook, sae, add_error=True))
    assert torch.equal(out, x)
    torch.testing.assert_close(logits, clean_logits(gpt2), atol=1e-5, rtol=1e-5)
    # The site holds the SAE code of the hooked activation.
    want = sae.encode(x)
    if kind == "topk":
        assert isinstance(site.code, SparseCode) and site.code.values.shape == (2, 7, 8)
        assert torch.equal(site.code.indices, want.indices)
        torch.testing.assert_close(site.code.values, want.values)
    else:
        assert site.code.shape == (2, 7, N_LATENTS)
        torch.testing.assert_close(site.code, want)
    torch.testing.assert_close(site.latents(), dense(want))


@pytest.mark.parametrize("kind", ["topk", "relu", "topk_layer_norm"])
def test_without_the_error_the_output_is_the_reconstruction(gpt2, kind):
    sae = make_sae(kind)
    x, out, logits, _ = hooked(gpt2, HOOK, attach(gpt2, HOOK, sae))
    with torch.no_grad(), splice(gpt2, HOOK, lambda h: sae(h).x_hat):
        want = gpt2(IDS).logits
    torch.testing.assert_close(out, sae(x).x_hat)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, clean_logits(gpt2), atol=1e-3)


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_zeroing_an_active_feature_subtracts_its_decoder_row(gpt2, kind):
    sae = make_sae(kind)
    with torch.no_grad():
        z = dense(sae.encode(hooked(gpt2, HOOK, ExitStack())[0]))
    j = int(z.sum(dim=(0, 1)).argmax())  # the latent with the most mass: active somewhere
    value = z[..., j]
    assert (value > 0).any() and (value == 0).any()
    x, out, logits, _ = hooked(gpt2, HOOK, steer(gpt2, HOOK, sae, zero=[j]))
    push = -value.unsqueeze(-1) * sae.W_dec[j].detach()
    torch.testing.assert_close(out - x, push, atol=1e-6, rtol=0)
    assert torch.equal(out[value == 0], x[value == 0])
    # The logits move exactly as pushing -value * W_dec[j] through the rest of the model.
    with torch.no_grad(), splice(gpt2, HOOK, lambda h: h + push):
        want = gpt2(IDS).logits
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert (logits - clean_logits(gpt2)).abs().max() > 1e-3


def _off_latent(code: SparseCode | torch.Tensor) -> int:
    """A latent that is zero at some token (for TopK: outside that token's top-k)."""
    return int((dense(code) == 0).flatten(0, -2)[0].nonzero()[0])


@pytest.mark.parametrize("add_error", [True, False])
@pytest.mark.parametrize("kind", ["topk", "relu", "topk_layer_norm"])
def test_edits_match_the_dense_computation(gpt2, kind, add_error):
    sae = make_sae(kind)
    x = hooked(gpt2, HOOK, ExitStack())[0]
    with torch.no_grad():
        z = dense(sae.encode(x))
    off = _off_latent(z)
    on = [int(j) for j in z.sum(dim=(0, 1)).argsort(descending=True) if int(j) != off][:2]
    edits = {"clamp": {off: 5.0}, "scale": {on[0]: 2.5}, "zero": [on[1]]}

    def edit(latents):
        latents[..., off] = 5.0
        latents[..., on[0]] *= 2.5
        latents[..., on[1]] = 0.0
        return latents

    _, out, _, _ = hooked(gpt2, HOOK, steer(gpt2, HOOK, sae, add_error=add_error, **edits))
    with torch.no_grad():
        want = dense_oracle(sae, x, edit, add_error)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_edit_delta_is_the_dense_decoder_difference(kind):
    sae = make_sae(kind, torch.float64)
    x = torch.randn(3, 5, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        code = sae.encode(x)
        z = dense(code)
        edits = FeatureEdits(clamp={0: -1.5, 7: 3.0}, scale={int(z.argmax()) % 64: 0.5}, zero=[9])
        got = edits.delta(sae, code)
        edited = z.clone()
        edited[..., 0], edited[..., 7], edited[..., 9] = -1.5, 3.0, 0.0
        edited[..., int(z.argmax()) % 64] *= 0.5
    torch.testing.assert_close(got, sae.decode(edited) - sae.decode(z), rtol=1e-12, atol=1e-12)


def test_positions(gpt2):
    sae = make_sae()
    last = steer(gpt2, HOOK, sae, clamp={3: 10.0}, positions=slice(-1, None))
    x, out, _, _ = hooked(gpt2, HOOK, last)
    changed = (out != x).any(dim=-1)
    assert changed[:, -1].all() and not changed[:, :-1].any()
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2] = mask[1, 4] = True
    x, out, _, _ = hooked(gpt2, HOOK, steer(gpt2, HOOK, sae, clamp={3: 10.0}, positions=mask))
    assert torch.equal((out != x).any(dim=-1), mask)
    with pytest.raises(ValueError, match=r"positions mask of shape \(3,\).*\(2, 7\)"):
        hooked(gpt2, HOOK, steer(gpt2, HOOK, sae, zero=[1], positions=torch.ones(3, dtype=bool)))


def test_generate(gpt2):
    sae = make_sae()
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        clean = gpt2.generate(IDS, attention_mask=torch.ones_like(IDS), **kwargs)
        with attach(gpt2, HOOK, sae, add_error=True) as site:
            same = gpt2.generate(IDS, attention_mask=torch.ones_like(IDS), **kwargs)
        # With the KV cache, each step after the prompt runs the hook on its new token alone.
        assert site.code.values.shape == (2, 1, 8)
        with steer(gpt2, HOOK, sae, clamp={5: 50.0}, positions=slice(-1, None)):
            steered = gpt2.generate(IDS, attention_mask=torch.ones_like(IDS), **kwargs)
    assert clean.shape == steered.shape == (2, 13)
    assert torch.equal(same, clean)
    assert torch.equal(steered[:, :7], IDS) and not torch.equal(steered, clean)


def test_sae_dtype_and_mode(gpt2):
    sae = make_sae(dtype=torch.float64).train()
    x, out, logits, site = hooked(gpt2, HOOK, attach(gpt2, HOOK, sae, add_error=True))
    assert torch.equal(logits, clean_logits(gpt2))
    assert site.code.values.dtype == torch.float64 and sae.training
    x, out, _, _ = hooked(gpt2, HOOK, steer(gpt2, HOOK, sae, clamp={2: 4.0}))
    assert out.dtype == torch.float32

    def edit(latents):
        latents[..., 2] = 4.0
        return latents

    with torch.no_grad():
        want = dense_oracle(sae, x, edit, add_error=True)
    torch.testing.assert_close(out, want.float())


def test_edits_can_change_inside_the_block(gpt2):
    sae, clean = make_sae(), clean_logits(gpt2)
    with torch.no_grad(), attach(gpt2, HOOK, sae, add_error=True) as site:
        assert torch.equal(gpt2(IDS).logits, clean)
        site.edits = FeatureEdits(clamp={4: 8.0})
        assert (gpt2(IDS).logits - clean).abs().max() > 1e-3
        with pytest.raises(ValueError, match="zero: latent 64 is out of range"):
            site.edits = FeatureEdits(zero=[64])


def test_hooks_are_removed_on_error(gpt2):
    sae = make_sae().train()
    module = resolve_hook(gpt2, HOOK)
    before = dict(module._forward_hooks)  # transformers keeps hooks of its own on blocks
    with pytest.raises(RuntimeError, match="boom"), steer(gpt2, HOOK, sae, zero=[1]):
        assert len(module._forward_hooks) == len(before) + 1 and not sae.training
        raise RuntimeError("boom")
    assert module._forward_hooks == before and sae.training
    narrow = SparseAutoencoder(16, N_LATENTS, k=4)
    with (
        pytest.raises(ValueError, match=r"d_in=16 does not match the width 32 of hook point"),
        attach(gpt2, HOOK, narrow),
    ):
        gpt2(IDS)
    assert module._forward_hooks == before


def test_errors_name_the_argument(gpt2):
    sae = make_sae()
    for kwargs, match in [
        ({"clamp": {64: 1.0}}, r"clamp: latent 64 is out of range .* 64 latents \(0\.\.63\)"),
        ({"scale": {-1: 2.0}}, "scale: latent -1 is out of range"),
        ({"zero": [100]}, "zero: latent 100 is out of range"),
    ]:
        with pytest.raises(ValueError, match=match), steer(gpt2, HOOK, sae, **kwargs):
            pass
    with pytest.raises(ValueError, match=r"latent 3 is edited twice \(in clamp and zero\)"):
        FeatureEdits(clamp={3: 1.0}, zero=[3])
    with pytest.raises(ValueError, match="latent 3 is edited twice"):
        FeatureEdits(zero=[3, 3])
    with pytest.raises(TypeError, match="zero: latent indices must be ints, got 1.5"):
        FeatureEdits(zero=[1.5])
    with pytest.raises(TypeError, match="clamp: latent indices must be ints, got True"):
        FeatureEdits(clamp={True: 1.0})
    with pytest.raises(ValueError, match="clamp: the value for latent 2 must be finite"):
        FeatureEdits(clamp={2: float("nan")})
    with pytest.raises(TypeError, match="scale must map latent -> value, got list"):
        FeatureEdits(scale=[1, 2])
    with pytest.raises(TypeError, match="positions must be a bool mask"):
        FeatureEdits(positions=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="positions must be None, a slice or a bool tensor"):
        FeatureEdits(positions=[0, 1])
    unknown = r"'resid_post\.5'.*resid_post\.0, resid_post\.1"
    with pytest.raises(HookPointError, match=unknown), attach(gpt2, "resid_post.5", sae):
        pass
    with (
        pytest.raises(TypeError, match="sae must be a SparseAutoencoder"),
        attach(gpt2, HOOK, torch.nn.Linear(32, 32)),
    ):
        pass
    with pytest.raises(RuntimeError, match=r"no forward has run through hook point 'resid_post.1'"):
        SAESite(HOOK, sae, add_error=True, edits=None).latents()
    assert FeatureEdits(zero=[torch.tensor(4)]).check(N_LATENTS) is None
