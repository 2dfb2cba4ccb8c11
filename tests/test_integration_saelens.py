"""The SAELens drop-in against the installed sae-lens: the same functions and gradients as
SAELens's own classes with the same weights, its runner training on them, and what it saves
loading in SAELens without sae_fast and in sae_fast.

The comparisons of one step are in float64, where the two sides differ only by the order of
their sums (1e-12); those of SAELens's runners and HookedSAETransformer in float32 (1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch
from integrations import require, without_sae_fast
from models import tiny_hooked_transformer

sae_lens = require("sae_lens")
pytestmark = pytest.mark.usefixtures("signal_handlers_kept")
from sae_lens.saes.batchtopk_sae import (  # noqa: E402
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
)
from sae_lens.saes.matryoshka_batchtopk_sae import (  # noqa: E402
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAE, TrainingSAE, TrainStepInput  # noqa: E402
from sae_lens.saes.topk_sae import (  # noqa: E402
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)

from sae_fast import SparseAutoencoder  # noqa: E402
from sae_fast.integrations import saelens as fast_saelens  # noqa: E402

D, M, K, N = 24, 96, 5, 37
TOL = {"atol": 1e-12, "rtol": 1e-10}

# kind: (SAELens's class, its config class, our architecture, extra config fields)
TRAINING = {
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, "sae_fast_topk", {}),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, "sae_fast_batchtopk", {}),
    "matryoshka": (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        "sae_fast_matryoshka_batchtopk",
        {"matryoshka_widths": [12, 40, M]},
    ),
}


def randomized(sae: SAE, seed: int = 0) -> SAE:
    """sae with decoder rows of norms 0.5 to 1.5, negative encoder biases and a random b_dec."""
    g = torch.Generator().manual_seed(seed)
    m, d = sae.W_dec.shape
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(m, 1, generator=g).to(sae.W_dec.dtype) + 0.5)
        sae.b_enc.copy_(-0.1 - 0.2 * torch.rand(m, generator=g))
        sae.b_dec.copy_(torch.randn(d, generator=g))
    return sae


def inputs(sae: SAE, seed: int = 1) -> torch.Tensor:
    """(N, D) activations; row 0 is b_dec, so all its pre-activations are negative."""
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0] = sae.b_dec.detach()
    return x


def pair(kind: str, **kw) -> tuple[TrainingSAE, TrainingSAE]:
    """(SAELens's training SAE, ours from fast()) with the same random weights."""
    cls, config_class, _, extra = TRAINING[kind]
    fields = {"d_in": D, "d_sae": M, "k": K, "dtype": "float64", **extra, **kw}
    theirs = randomized(cls(config_class(**fields)))
    return theirs, fast_saelens.fast(theirs)


def step(sae: TrainingSAE, x: torch.Tensor, dead: torch.Tensor | None) -> dict:
    """One training_forward_pass and backward: its outputs (feature_acts dense) and grads."""
    sae.zero_grad()
    out = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0,
            is_logging_step=False,
        )
    )  # fmt: skip
    out.loss.backward()
    acts = out.feature_acts
    return {
        "loss": out.loss.detach(),
        "losses": {k: v.detach() for k, v in out.losses.items()},
        "sae_out": out.sae_out.detach(),
        "feature_acts": (acts.to_dense() if acts.is_sparse else acts).detach(),
        "grads": {name: p.grad.clone() for name, p in sae.named_parameters()},
        "is_sparse": acts.is_sparse,
    }


def assert_same_step(theirs: dict, ours: dict) -> None:
    torch.testing.assert_close(ours["loss"], theirs["loss"], **TOL)
    assert list(ours["losses"]) == list(theirs["losses"])
    for name, value in theirs["losses"].items():
        torch.testing.assert_close(ours["losses"][name], value, **TOL, msg=name)
    torch.testing.assert_close(ours["sae_out"], theirs["sae_out"], **TOL)
    torch.testing.assert_close(ours["feature_acts"], theirs["feature_acts"], **TOL)
    for name, grad in theirs["grads"].items():
        torch.testing.assert_close(ours["grads"][name], grad, **TOL, msg=f"grad of {name}")


DEAD = {
    "no mask": None,
    "none dead": torch.zeros(M, dtype=torch.bool),
    "a few dead": torch.arange(M) % 11 == 3,  # fewer than d/2: negative pre-activations enter
    "many dead": torch.arange(M) % 3 > 0,
}


@pytest.mark.parametrize("rescale", [True, False], ids=["rescaled", "not rescaled"])
@pytest.mark.parametrize("dead", DEAD.values(), ids=DEAD.keys())
@pytest.mark.parametrize("kind", TRAINING)
def test_training_step_equals_saelens(kind, dead, rescale):
    theirs, ours = pair(kind, rescale_acts_by_decoder_norm=rescale)
    x = inputs(theirs)
    assert ours.cfg.architecture() == TRAINING[kind][2]
    got, want = step(ours, x, dead), step(theirs, x, dead)
    assert got["is_sparse"], "our feature_acts must be sparse: no dense (n, m) tensor"
    assert_same_step(want, got)
    assert torch.count_nonzero(got["feature_acts"][0]) == 0, "row 0's pre-activations are negative"
    if kind != "topk":
        torch.testing.assert_close(ours.topk_threshold, theirs.topk_threshold, **TOL)
        assert float(ours.topk_threshold) > 0


@pytest.mark.parametrize("rescale", [True, False], ids=["rescaled", "not rescaled"])
@pytest.mark.parametrize("kind", TRAINING)
def test_encode_decode_forward_equal_saelens(kind, rescale):
    theirs, ours = pair(kind, rescale_acts_by_decoder_norm=rescale)
    x = inputs(theirs).reshape(1, N, D)  # leading dims, as a hooked model gives them
    for sae in (theirs, ours):
        sae.zero_grad()
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), **TOL)
    torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)), **TOL)
    out_theirs, out_ours = theirs(x), ours(x)
    torch.testing.assert_close(out_ours, out_theirs, **TOL)
    (out_theirs.square().sum()).backward()
    (out_ours.square().sum()).backward()
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=f"grad of {name}")


def test_sparse_activations_option_gives_a_sparse_encode():
    theirs, ours = pair("topk", use_sparse_activations=True)
    x = inputs(theirs)
    got, want = ours.encode(x), theirs.encode(x)
    assert got.is_sparse and want.is_sparse
    torch.testing.assert_close(got.to_dense(), want.to_dense(), **TOL)


def test_inference_topk_sae_and_its_error_term():
    theirs = randomized(TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K, dtype="float64")))
    ours = fast_saelens.fast(theirs)
    assert isinstance(ours, fast_saelens.FastTopKSAE) and ours.cfg.architecture() == "sae_fast_topk"
    x = inputs(theirs)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    theirs.use_error_term = ours.use_error_term = True
    torch.testing.assert_close(ours(x), x, **TOL)  # reconstruction plus its error: x itself
    assert fast_saelens.fast(ours) is ours


@pytest.mark.parametrize("how", ["TransformerLens add_hook", "torch register_forward_hook"])
def test_a_hook_on_the_dense_activations_runs_saelens_code(how):
    theirs, ours = pair("topk")
    x = inputs(theirs)
    seen = []

    def double(acts, hook=None):
        return acts * 2

    def doubling_and_seen(acts, hook=None):
        seen.append(acts.shape)
        return acts * 2

    for sae, fn in ((theirs, double), (ours, doubling_and_seen)):
        if how.startswith("torch"):
            sae.hook_sae_acts_post.register_forward_hook(lambda mod, args, out, fn=fn: fn(out))
        else:
            sae.hook_sae_acts_post.add_hook(fn)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert seen == [(N, M)], "the hook sees SAELens's dense activations"
    assert not torch.allclose(ours(x), fast_saelens.fast(TopKTrainingSAE(theirs.cfg))(x))


@pytest.mark.parametrize(
    "cfg",
    [{"apply_b_dec_to_input": False}, {"normalize_activations": "layer_norm"}],
    ids=["b_dec not subtracted", "layer norm (SAELens's code)"],
)
def test_config_variants_equal_saelens(cfg):
    theirs, ours = pair("topk", **cfg)
    x = inputs(theirs, seed=4)
    assert_same_step(step(theirs, x, None), step(ours, x, None))


def test_a_batch_budget_of_zero_decodes_b_dec():
    theirs, ours = pair("batchtopk", k=0.5)  # int(0.5 * 1) = 0 latents for a batch of one row
    x = inputs(theirs)[1:2]
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    torch.testing.assert_close(ours(x)[0], ours.b_dec.detach(), **TOL)


def test_autocast_runs_the_sparse_ops_in_its_dtype():
    theirs, ours = pair("topk", dtype="float32")
    x = inputs(theirs).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = step(ours, x, DEAD["many dead"]), step(theirs, x, DEAD["many dead"])
    assert got["sae_out"].dtype == want["sae_out"].dtype
    torch.testing.assert_close(got["loss"], want["loss"], rtol=2e-2, atol=0)


def test_fast_copies_the_config_and_keeps_the_threshold_in_float64():
    theirs = randomized(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=M, k=K)))
    before = theirs.cfg.metadata.training_architecture
    ours = fast_saelens.fast(theirs)
    assert theirs.cfg.metadata.training_architecture == before
    assert ours.cfg.metadata is not theirs.cfg.metadata
    assert ours.W_dec.dtype == torch.float32 and ours.topk_threshold.dtype == torch.float64


def test_fast_refuses_other_architectures():
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    with pytest.raises(TypeError, match="sae must be one of SAELens's TopKSAE"):
        fast_saelens.fast(StandardSAE(StandardSAEConfig(d_in=D, d_sae=M)))


def test_registered_in_saelens_registries():
    from sae_lens.registry import get_sae_class, get_sae_training_class

    assert get_sae_class("sae_fast_topk")[0] is fast_saelens.FastTopKSAE
    for _, _, name, extra in TRAINING.values():
        cls, config_class = fast_saelens.ARCHITECTURES[name]
        assert get_sae_training_class(name) == (cls, config_class)
        # The runner rebuilds the SAE through the registry from the config's dict.
        cfg = config_class(d_in=D, d_sae=M, k=K, **extra)
        rebuilt = TrainingSAE.from_dict(cfg.to_dict())
        assert type(rebuilt) is cls
    fast_saelens.register()  # again: a no-op, where SAELens's own call would raise


# --- SAELens's runner ------------------------------------------------------------------------


def run_saelens(tmp_path, sae_cfg, name: str, steps: int = 12, seed: int = 0):
    """Train sae_cfg with SAELens's LanguageModelSAETrainingRunner on a tiny random model and
    in-memory tokens; returns the trained SAE and the folder it saved."""
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    tokens = torch.randint(0, 100, (64, 16), generator=torch.Generator().manual_seed(7))
    out = tmp_path / name
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name="tiny", hook_name="blocks.0.hook_resid_post",
        is_dataset_tokenized=True, streaming=False, context_size=16,
        training_tokens=64 * steps, train_batch_size_tokens=64, store_batch_size_prompts=4,
        n_batches_in_buffer=8, device="cpu", logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None, n_checkpoints=0, output_path=str(out), verbose=False, seed=seed,
        dead_feature_window=3, lr=3e-3,
    )  # fmt: skip
    torch.manual_seed(seed)
    runner = LanguageModelSAETrainingRunner(
        cfg,
        override_dataset=Dataset.from_dict({"tokens": tokens.tolist()}),
        override_model=tiny_hooked_transformer(),
    )
    return runner.run(), out


@pytest.mark.parametrize("kind", TRAINING)
def test_saelens_runner_trains_ours_as_it_trains_its_own(tmp_path, kind):
    theirs_class, theirs_cfg, name, extra = TRAINING[kind]
    ours_class, ours_cfg = fast_saelens.ARCHITECTURES[name]
    common = {"d_in": 32, "d_sae": 128, "k": 4, "aux_loss_coefficient": 1 / 32}
    if extra:
        common["matryoshka_widths"] = [32, 128]
    ours, ours_dir = run_saelens(tmp_path, ours_cfg(**common), "ours")
    theirs, theirs_dir = run_saelens(tmp_path, theirs_cfg(**common), "theirs")
    assert type(ours) is ours_class and type(theirs) is theirs_class
    # The same init, data and steps: float32 sums in another order, nothing else.
    for (param, p), q in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=param)
    # What the runner saved: SAELens's own inference architecture, loadable without us.
    saved = json.loads((ours_dir / "cfg.json").read_text())
    arch = "topk" if kind == "topk" else "jumprelu"
    assert saved["architecture"] == arch
    assert saved["metadata"]["training_architecture"] == name
    assert saved["metadata"]["num_dead_features"] > 0, "AuxK must have had dead latents"
    assert (ours_dir / "sparsity.safetensors").exists()
    x = torch.randn(20, 32)
    want = SAE.load_from_disk(str(theirs_dir))(x)
    loads = f"from sae_lens import SAE\nsae = SAE.load_from_disk({str(ours_dir)!r})\n"
    got, printed = without_sae_fast(loads + "y = sae(x)\nprint(type(sae).__name__)", x, tmp_path)
    assert printed == {"topk": "TopKSAE", "jumprelu": "JumpReLUSAE"}[arch]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # And in sae_fast: its own loader reads SAELens's folder.
    loaded = SparseAutoencoder.load(ours_dir)
    assert loaded.activation == arch
    torch.testing.assert_close(loaded(x).x_hat, got, atol=1e-5, rtol=1e-4)


def test_multi_sae_runner_trains_ours(tmp_path):
    from datasets import Dataset
    from sae_lens import LoggingConfig, MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    tokens = torch.randint(0, 100, (64, 16), generator=torch.Generator().manual_seed(7))
    cfg = MultiSAETrainingRunnerConfig(
        saes={
            "a": fast_saelens.FastTopKTrainingSAEConfig(d_in=32, d_sae=64, k=4),
            "b": fast_saelens.FastBatchTopKTrainingSAEConfig(d_in=32, d_sae=64, k=4),
        },
        hook_names={"a": "blocks.0.hook_resid_post", "b": "blocks.1.hook_resid_post"},
        model_name="tiny", streaming=False, context_size=16, training_tokens=64 * 6,
        train_batch_size_tokens=64, store_batch_size_prompts=4, n_batches_in_buffer=8,
        device="cpu", logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None, n_checkpoints=0, output_path=str(tmp_path / "multi"),
    )  # fmt: skip
    runner = MultiSAETrainingRunner(
        cfg,
        override_dataset=Dataset.from_dict({"tokens": tokens.tolist()}),
        override_model=tiny_hooked_transformer(),
    )
    saes = runner.run()
    assert {type(s).__name__ for s in saes.values()} == {
        "FastTopKTrainingSAE", "FastBatchTopKTrainingSAE",
    }  # fmt: skip
    for name, arch in (("a", "topk"), ("b", "jumprelu")):
        saved = json.loads((tmp_path / "multi" / name / "cfg.json").read_text())
        assert saved["architecture"] == arch


# --- HookedSAETransformer ----------------------------------------------------------------------


def test_hooked_sae_transformer_runs_ours_as_saelens_topk():
    from sae_lens import HookedSAETransformer

    base = tiny_hooked_transformer()
    model = HookedSAETransformer(base.cfg)
    model.load_state_dict(base.state_dict(), strict=False)
    theirs = randomized(TopKSAE(TopKSAEConfig(d_in=32, d_sae=128, k=4)))
    theirs.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    ours = fast_saelens.fast(theirs)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    want = model.run_with_saes(tokens, saes=[theirs])
    got = model.run_with_saes(tokens, saes=[ours])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, model(tokens), atol=1e-3), "the SAE must change the logits"
    # run_with_cache hooks the dense activations: SAELens's code, the same cache.
    _, cache = model.run_with_cache_with_saes(tokens, saes=[ours])
    _, their_cache = model.run_with_cache_with_saes(tokens, saes=[theirs])
    key = "blocks.0.hook_resid_post.hook_sae_acts_post"
    torch.testing.assert_close(cache[key], their_cache[key], atol=1e-5, rtol=1e-4)
    assert int((cache[key] != 0).sum(-1).max()) == 4
    # With the error term the model's outputs come back unchanged.
    kept = model.run_with_saes(tokens, saes=[ours], use_error_term=True)
    torch.testing.assert_close(kept, model(tokens), atol=1e-4, rtol=1e-4)
