"""Hook points on tiny GPT-2 and BERT: names, capture against hidden states, splice, loading."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from models import WIDTH, tiny_bert, tiny_causal_lm
from transformers import BertModel, GPT2LMHeadModel

from sae_fast.sources import (
    HookPointError,
    capture,
    hook_points,
    load_model,
    minilm_path,
    probe_hook,
    resolve_hook,
    run_to_hook,
    splice,
)

FRIENDLY = ["resid_post.0", "resid_post.1", "mlp_in.0", "mlp_in.1", "mlp_out.0", "mlp_out.1"]
FRIENDLY += ["attn_out.0", "attn_out.1"]
IDS = torch.tensor(
    [[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2023, 2003, 2178, 2028, 102, 0]]
)
MASK = (IDS != 0).long()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_causal_lm()[0]


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()[0]


def _captured(model, names, **inputs):
    """Outputs of the hook points names and of the model, from one forward."""
    with torch.no_grad(), ExitStack() as stack:
        held = [stack.enter_context(capture(model, name)) for name in names]
        out = model(**inputs, output_hidden_states=True)
    return [h.output for h in held], out


def test_friendly_hook_points(gpt2, bert):
    assert hook_points(gpt2) == FRIENDLY
    assert hook_points(bert) == FRIENDLY
    assert resolve_hook(gpt2, "mlp_out.1") is gpt2.transformer.h[1].mlp
    assert resolve_hook(gpt2, "attn_out.0") is gpt2.transformer.h[0].attn
    assert resolve_hook(bert, "mlp_out.0") is bert.encoder.layer[0].output.dense
    assert resolve_hook(bert, "attn_out.1") is bert.encoder.layer[1].attention.output.dense
    assert resolve_hook(gpt2, "transformer.h.0.ln_2") is gpt2.transformer.h[0].ln_2
    # mlp_in: the module whose output the MLP reads.
    assert resolve_hook(gpt2, "mlp_in.1") is gpt2.transformer.h[1].ln_2
    assert resolve_hook(bert, "mlp_in.0") is bert.encoder.layer[0].attention


@pytest.mark.parametrize("build", [tiny_causal_lm, tiny_bert])
def test_mlp_in_is_what_the_mlp_reads(build):
    model = build()[0]
    mlp = model.get_submodule("transformer.h.1.mlp" if build is tiny_causal_lm else
                              "encoder.layer.1.intermediate")  # fmt: skip
    read = {}
    handle = mlp.register_forward_pre_hook(lambda module, args: read.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            model(input_ids=IDS, attention_mask=MASK)
    finally:
        handle.remove()
    assert torch.equal(
        run_to_hook(model, "mlp_in.1", input_ids=IDS, attention_mask=MASK), read["x"]
    )


def test_bad_hook_point_lists_the_valid_ones(gpt2):
    with pytest.raises(HookPointError, match=r"'resid_post\.2'") as err:
        resolve_hook(gpt2, "resid_post.2")
    assert all(name in str(err.value) for name in FRIENDLY)
    assert "named_modules" in str(err.value)
    with pytest.raises(HookPointError, match="''"):
        resolve_hook(gpt2, "")


def test_gpt2_capture_matches_hidden_states(gpt2):
    names = ["resid_post.0", "resid_post.1", "attn_out.0", "mlp_out.0"]
    (resid0, resid1, attn0, mlp0), out = _captured(gpt2, names, input_ids=IDS, attention_mask=MASK)
    hidden = out.hidden_states
    assert resid0.shape == attn0.shape == mlp0.shape == (2, 7, WIDTH)
    assert torch.equal(resid0, hidden[1])
    # GPT-2's last hidden state has the final layer norm applied.
    assert torch.equal(gpt2.transformer.ln_f(resid1), hidden[2])
    # The block adds its attention and MLP outputs to the residual stream.
    torch.testing.assert_close(hidden[0] + attn0 + mlp0, resid0)


def test_bert_capture_matches_hidden_states(bert):
    names = ["resid_post.1", "resid_post.0", "attn_out.0", "mlp_out.0"]
    (resid1, resid0, attn0, mlp0), out = _captured(bert, names, input_ids=IDS, attention_mask=MASK)
    hidden, layer = out.hidden_states, bert.encoder.layer[0]
    assert resid1.shape == (2, 7, WIDTH) and torch.equal(resid1, hidden[2])
    assert torch.equal(resid0, hidden[1])
    # Post-LN BERT: each sublayer's dense output is added to its input, then normalised.
    attention = layer.attention.output.LayerNorm(attn0 + hidden[0])
    torch.testing.assert_close(layer.output.LayerNorm(mlp0 + attention), resid0)
    assert mlp0.shape == attn0.shape == (2, 7, WIDTH)


def test_capture_can_stop_the_forward(gpt2):
    calls = []
    handle = gpt2.transformer.h[1].register_forward_hook(lambda *args: calls.append(1))
    try:
        out = run_to_hook(gpt2, "resid_post.0", input_ids=IDS)
        assert not calls, "layer 1 ran after the hook point"
        _, full = _captured(gpt2, [], input_ids=IDS)
        assert calls
    finally:
        handle.remove()
    assert torch.equal(out, full.hidden_states[1])
    probe = probe_hook(gpt2, "mlp_out.1")
    assert probe.shape == (1, 1, WIDTH) and probe.dtype == torch.float32


def test_hooks_are_removed(gpt2):
    module = resolve_hook(gpt2, "resid_post.0")
    before = dict(module._forward_hooks)  # transformers keeps hooks of its own on blocks
    with capture(gpt2, "resid_post.0"), splice(gpt2, "resid_post.0", lambda t: t):
        assert len(module._forward_hooks) == len(before) + 2
    assert module._forward_hooks == before


@pytest.mark.parametrize("hook", ["resid_post.0", "attn_out.1", "mlp_out.0"])
def test_splice(gpt2, hook):
    with torch.no_grad():
        logits = gpt2(IDS).logits
        with splice(gpt2, hook, lambda t: t.clone()):
            same = gpt2(IDS).logits
        with splice(gpt2, hook, torch.zeros_like):
            changed = gpt2(IDS).logits
        with splice(gpt2, hook, torch.zeros_like), capture(gpt2, hook) as held:
            gpt2(IDS)
    assert torch.equal(same, logits)
    assert not torch.allclose(changed, logits)
    assert torch.equal(held.output, torch.zeros(2, 7, WIDTH))


def test_splice_must_keep_the_shape(gpt2):
    with (
        pytest.raises(HookPointError, match=r"keep the shape \(2, 7, 32\).*got \(2, 7\)"),
        splice(gpt2, "resid_post.0", lambda t: t.sum(-1)),
    ):
        gpt2(IDS)


def test_load_model_picks_the_class_and_loads_offline(tmp_path):
    for build, cls in ((tiny_causal_lm, GPT2LMHeadModel), (tiny_bert, BertModel)):
        model, tokenizer = build()
        folder = tmp_path / cls.__name__
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        loaded, loaded_tokenizer = load_model(folder, dtype=torch.float64)
        assert type(loaded) is cls and not loaded.training
        assert next(loaded.parameters()).dtype == torch.float64
        assert loaded_tokenizer("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
        with torch.no_grad():
            want = model(IDS).logits if cls is GPT2LMHeadModel else model(IDS).last_hidden_state
            got = loaded(IDS)[0]
        torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-5)


def test_minilm_package():
    path = minilm_path()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
