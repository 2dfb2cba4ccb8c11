"""SAELens checkpoints: what sae_lens itself saves loads as the same function, and back.

Each SAELens SAE gets random weights (nonzero biases, decoder rows of norms 0.5 to 2), is
saved with its own save_model and loaded with SparseAutoencoder.load (format detected). Ours
must give the same reconstruction, the same latents (the same active set), and the same
gradients of the reconstruction MSE: with respect to x always, and with respect to each weight
where the mapping is the identity or a transpose (no fold). CI installs sae-lens with the
`bench` extra; without it these tests skip.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_fast import CheckpointError, SparseAutoencoder, formats
from sae_fast import reference as ref
from sae_fast.formats import saelens as saelens_format
from sae_fast.ops import SparseCode
from sae_fast.training.losses import matryoshka_decode

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is the `bench` extra")
saes = sae_lens.saes
TrainStepInput = pytest.importorskip("sae_lens.saes.sae").TrainStepInput

D, M, K, N = 12, 40, 5, 24
ATOL, RTOL = 2e-5, 1e-4


def randomize(sae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights in place: pre-activations of order 1, decoder norms 0.5 to 2."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_dec":
                rows = rand(*p.shape)
                p.copy_(
                    rows
                    / rows.norm(dim=1, keepdim=True)
                    * (0.5 + 1.5 * torch.rand(M, 1, generator=g))
                )
            elif name == "W_enc":
                p.copy_(0.3 * rand(*p.shape))
            elif name == "threshold":
                p.copy_(0.1 + 0.5 * torch.rand(p.shape, generator=g))
            else:  # b_enc, b_dec, b_gate, b_mag, r_mag
                p.copy_(0.2 * rand(*p.shape))
    return sae


def inputs(seed: int = 1) -> torch.Tensor:
    return 1.5 * torch.randn(N, D, generator=torch.Generator().manual_seed(seed)) + 0.3


def dense(code: SparseCode | torch.Tensor) -> torch.Tensor:
    if isinstance(code, SparseCode):
        return ref.sparse_to_dense(code.values, code.indices, M)
    return code


def their_grads(theirs: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Their weight gradients under our names and layout (a transpose at most)."""
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    grads["W_enc"] = grads["W_enc"].T
    if "b_gate" in grads:
        grads["b_enc"] = grads.pop("b_gate")
    if "threshold" in grads:  # d/dlog t = t d/dt
        grads["log_threshold"] = grads.pop("threshold") * theirs.threshold.detach()
    return grads


def assert_same_function(
    theirs: torch.nn.Module, ours: SparseAutoencoder, x: torch.Tensor, same_weights: bool
) -> None:
    """Same x_hat, latents and MSE gradients (weights too when same_weights)."""
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    x_hat = theirs(x_theirs)
    out = ours(x_ours)
    torch.testing.assert_close(out.x_hat, x_hat, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        z_theirs, z_ours = theirs.encode(x), dense(out.code)
    assert torch.equal(z_ours != 0, z_theirs != 0), "different active latents"
    assert (z_ours != 0).any() and (z_ours == 0).any()
    torch.testing.assert_close(z_ours, z_theirs, atol=ATOL, rtol=RTOL)

    ref.mse(x, x_hat).backward()
    ref.mse(x, out.x_hat).backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=1e-6, rtol=1e-4)
    if same_weights:
        grads = their_grads(theirs)
        ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
        if isinstance(theirs, saes.JumpReLUSAE):  # its threshold gets no gradient (a mask)
            ours_grads.pop("log_threshold")
        assert set(grads) <= set(ours_grads)
        for name, grad in ours_grads.items():
            # Gated's gate bias gets none there (only the step sees it); ours cancels to zero.
            want = grads.get(name, torch.zeros_like(grad))
            torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-4, msg=name)


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], torch.nn.Module]
    activation: str
    same_weights: bool  # the mapping is the identity or a transpose: no fold


def _cfg(cls: type, **kw) -> object:
    return cls(d_in=D, d_sae=M, **kw)


CASES = [
    Case("standard", lambda: saes.StandardSAE(_cfg(saes.StandardSAEConfig)), "relu", True),
    Case(
        "standard-no-b_dec-in-encoder",
        lambda: saes.StandardSAE(_cfg(saes.StandardSAEConfig, apply_b_dec_to_input=False)),
        "relu",
        False,
    ),
    Case(
        "standard-layer_norm",
        lambda: saes.StandardSAE(_cfg(saes.StandardSAEConfig, normalize_activations="layer_norm")),
        "relu",
        True,
    ),
    Case(
        "standard-training",
        lambda: saes.StandardTrainingSAE(_cfg(saes.StandardTrainingSAEConfig)),
        "relu",
        True,
    ),
    Case("topk", lambda: saes.TopKSAE(_cfg(saes.TopKSAEConfig, k=K)), "topk", True),
    Case(
        "topk-rescaled-no-b_dec-in-encoder",
        lambda: saes.TopKSAE(
            _cfg(
                saes.TopKSAEConfig,
                k=K,
                rescale_acts_by_decoder_norm=True,
                apply_b_dec_to_input=False,
            )
        ),
        "topk",
        False,
    ),
    Case(  # its training config rescales by the decoder norms by default
        "topk-training",
        lambda: saes.TopKTrainingSAE(_cfg(saes.TopKTrainingSAEConfig, k=K)),
        "topk",
        False,
    ),
    Case(
        "topk-constant_norm_rescale",
        lambda: saes.TopKSAE(
            _cfg(saes.TopKSAEConfig, k=K, normalize_activations="constant_norm_rescale")
        ),
        "topk",
        True,
    ),
    Case("jumprelu", lambda: saes.JumpReLUSAE(_cfg(saes.JumpReLUSAEConfig)), "jumprelu", True),
    Case(
        "jumprelu-no-b_dec-in-encoder",
        lambda: saes.JumpReLUSAE(_cfg(saes.JumpReLUSAEConfig, apply_b_dec_to_input=False)),
        "jumprelu",
        False,
    ),
    Case(  # its straight-through threshold gradient matches ours at its bandwidth
        "jumprelu-training",
        lambda: saes.JumpReLUTrainingSAE(
            _cfg(saes.JumpReLUTrainingSAEConfig, jumprelu_bandwidth=0.4)
        ),
        "jumprelu",
        True,
    ),
    Case("gated", lambda: saes.GatedSAE(_cfg(saes.GatedSAEConfig)), "gated", True),
    Case(
        "gated-no-b_dec-in-encoder-layer_norm",
        lambda: saes.GatedSAE(
            _cfg(
                saes.GatedSAEConfig, apply_b_dec_to_input=False, normalize_activations="layer_norm"
            )
        ),
        "gated",
        False,
    ),
    Case(
        "gated-training",
        lambda: saes.GatedTrainingSAE(_cfg(saes.GatedTrainingSAEConfig)),
        "gated",
        True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_saelens_checkpoint_loads_as_the_same_function(tmp_path, case):
    theirs = randomize(case.make())
    theirs.save_model(tmp_path)
    assert formats.detect(tmp_path) == "saelens"
    ours = SparseAutoencoder.load(tmp_path)
    assert (ours.activation, ours.d_in, ours.n_latents) == (case.activation, D, M)
    assert ours.k == (K if case.activation == "topk" else None)
    assert_same_function(theirs, ours, inputs(), case.same_weights)


def test_layer_norm_maps_back_with_std_alone(tmp_path):
    """SAELens divides by std + 1e-5 and multiplies back by std alone; where std is small the
    difference is far above float32 rounding."""
    cfg = _cfg(saes.StandardSAEConfig, normalize_activations="layer_norm")
    theirs = randomize(saes.StandardSAE(cfg))
    theirs.save_model(tmp_path)
    x = 1e-3 * inputs()
    with torch.no_grad():
        want = theirs(x)
        torch.testing.assert_close(
            SparseAutoencoder.load(tmp_path)(x).x_hat, want, atol=1e-9, rtol=1e-4
        )


def test_jumprelu_bandwidth_comes_from_the_training_config(tmp_path):
    theirs = randomize(
        saes.JumpReLUTrainingSAE(_cfg(saes.JumpReLUTrainingSAEConfig, jumprelu_bandwidth=0.4))
    )
    theirs.save_model(tmp_path / "training")
    theirs.save_inference_model(tmp_path / "inference")  # only metadata keeps it there
    for folder in ("training", "inference"):
        assert SparseAutoencoder.load(tmp_path / folder).jumprelu_bandwidth == 0.4


@pytest.mark.parametrize("matryoshka", [False, True], ids=["batchtopk", "matryoshka"])
def test_batchtopk_training_saes_load_as_batchtopk(tmp_path, matryoshka):
    if matryoshka:
        cfg = _cfg(saes.MatryoshkaBatchTopKTrainingSAEConfig, k=K, matryoshka_widths=[M // 4, M])
        theirs = saes.MatryoshkaBatchTopKTrainingSAE(cfg)
    else:
        theirs = saes.BatchTopKTrainingSAE(_cfg(saes.BatchTopKTrainingSAEConfig, k=K))
    randomize(theirs)
    x = inputs()
    theirs.save_model(tmp_path / "never-calibrated")
    with torch.no_grad():  # what its training would have reached (in rescaled units)
        theirs.topk_threshold.fill_(0.35)
    theirs.save_model(tmp_path / "training")
    theirs.save_inference_model(tmp_path / "inference")  # a JumpReLU at that threshold

    ours = SparseAutoencoder.load(tmp_path / "training")
    assert (ours.activation, ours.k) == ("batchtopk", K)
    assert float(ours.threshold) == pytest.approx(0.35)
    # Training: both select the top N*K of the batch (rescaled by decoder norms, folded here).
    assert_same_function(theirs, ours.train(), x, same_weights=False)
    # Inference: SAELens's own export of it, a JumpReLU with the learned threshold.
    exported = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    assert_same_function(exported, ours.eval(), x, same_weights=False)
    # A threshold never updated from its initial 0: their class runs batch top-k, and so do we.
    fresh = SparseAutoencoder.load(tmp_path / "never-calibrated")
    assert float(fresh.threshold) < 0
    assert_same_function(theirs, fresh.eval(), x, same_weights=False)
    assert ours.matryoshka == ([M // 4, M] if matryoshka else None)
    if matryoshka:  # SAELens's inner loss at width M/4 is our prefix's error, from its code
        out = theirs.training_forward_pass(
            TrainStepInput(x, {}, dead_neuron_mask=None, n_training_steps=0,
                           is_logging_step=False)
        )  # fmt: skip
        code = ours.train().encode(x)
        prefixes = matryoshka_decode(ours, code)
        inner = (x - prefixes[:, 0]).pow(2).sum(-1).mean()
        torch.testing.assert_close(inner, out.losses[f"inner_mse_loss_{M // 4}"].to(inner.dtype))


def test_expected_average_only_in_folds_the_trainers_scaling_factor(tmp_path):
    theirs = randomize(
        saes.StandardSAE(
            _cfg(saes.StandardSAEConfig, normalize_activations="expected_average_only_in")
        )
    )
    theirs.save_model(tmp_path)
    with pytest.raises(CheckpointError, match=r"expected_average_only_in.*activation_scaler\.json"):
        SparseAutoencoder.load(tmp_path)
    scaler = {"scaling_factor": 2.5, "has_whitening": False}  # what SAELens's trainer writes
    (tmp_path / "activation_scaler.json").write_text(json.dumps(scaler))
    ours = SparseAutoencoder.load(tmp_path)
    theirs.fold_activation_norm_scaling_factor(2.5)  # SAELens's fold: the same weights as ours
    assert_same_function(theirs, ours, inputs(), same_weights=True)


def _pre_6_folder(path, factor: torch.Tensor | None = None) -> None:
    """A SAELens 3-5 TopK folder: activation_fn_str/kwargs, a bool normalize_activations."""
    path.mkdir()
    cfg = {
        "model_name": "gpt2",
        "hook_point": "blocks.0.hook_resid_pre",
        "d_in": D,
        "d_sae": M,
        "dtype": "torch.float32",
        "device": "cpu",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": False,
        "normalize_activations": False,
        "finetuning_scaling_factor": factor is not None,
        "sae_lens_training_version": "3.13.0",
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    tensors = {
        name: p.detach()
        for name, p in randomize(saes.TopKSAE(_cfg(saes.TopKSAEConfig, k=K))).named_parameters()
    }
    if factor is not None:
        tensors["scaling_factor"] = factor
    save_file(tensors, path / "sae_weights.safetensors")


def test_pre_6_layouts_load(tmp_path):
    _pre_6_folder(tmp_path / "old")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "old")
    assert isinstance(theirs, saes.TopKSAE) and not theirs.cfg.apply_b_dec_to_input
    assert_same_function(theirs, SparseAutoencoder.load(tmp_path / "old"), inputs(), False)

    # A finetuning scaling factor (SAELens 6 no longer loads one): x_hat = (z * f) @ W_dec + b_dec
    factor = 0.5 + torch.rand(M, generator=torch.Generator().manual_seed(3))
    _pre_6_folder(tmp_path / "scaled", factor)
    ours = SparseAutoencoder.load(tmp_path / "scaled")
    x = inputs()
    with torch.no_grad():
        want = (theirs.encode(x) * factor) @ theirs.W_dec + theirs.b_dec
        torch.testing.assert_close(ours(x).x_hat, want, atol=ATOL, rtol=RTOL)


def our_random(activation: str, **kw) -> SparseAutoencoder:
    """Our SAE of activation (options kw), randomized; thresholds between 0.1 and 0.6."""
    torch.manual_seed(0)
    k = K if activation in ("topk", "batchtopk") else None
    ours = randomize(SparseAutoencoder(D, M, k=k, activation=activation, **kw))
    if activation == "jumprelu":
        with torch.no_grad():
            ours.log_threshold.copy_(torch.empty(M).uniform_(0.1, 0.6).log())
    if activation == "batchtopk":
        ours.threshold.fill_(0.3)
    return ours


@pytest.mark.parametrize(
    ("activation", "input_norm"),
    [
        ("topk", "none"),
        ("relu", "layer_norm"),
        ("jumprelu", "none"),
        ("gated", "constant_norm"),
        ("batchtopk", "none"),
    ],
)
def test_our_saes_saved_as_saelens_load_in_saelens(tmp_path, activation, input_norm):
    ours = our_random(activation, input_norm=input_norm)
    ours.eval().save(tmp_path, format="saelens")

    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    want = {"relu": "standard", "batchtopk": "jumprelu"}.get(activation, activation)
    assert theirs.cfg.architecture() == want
    assert_same_function(theirs, ours, inputs(), same_weights=activation != "batchtopk")

    back = SparseAutoencoder.load(tmp_path)  # and back: the same module, batchtopk included
    assert back.config() == ours.config()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_survives_both_ways(tmp_path, dtype):
    ours = SparseAutoencoder(D, M, k=K, dtype=dtype)
    ours.save(tmp_path, format="saelens")
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.W_enc.dtype == dtype and torch.equal(theirs.W_enc, ours.W_enc.detach().T)
    back = SparseAutoencoder.load(tmp_path)
    assert back.W_enc.dtype == dtype and torch.equal(back.W_enc, ours.W_enc)


def test_uncalibrated_batchtopk_is_not_saved(tmp_path):
    ours = SparseAutoencoder(D, M, k=K, activation="batchtopk")
    with pytest.raises(CheckpointError, match="no calibrated threshold"):
        ours.save(tmp_path, format="saelens")


def _saved(path, sae: torch.nn.Module | None = None):
    if sae is None:
        sae = randomize(saes.TopKSAE(_cfg(saes.TopKSAEConfig, k=K)))
    sae.save_model(path)
    return path


def _edit_cfg(path, **fields) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, **fields}))


def test_bad_and_foreign_folders_say_what_is_wrong(tmp_path):
    folder = _saved(tmp_path / "no-weights")
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no sae_weights.safetensors"):
        SparseAutoencoder.load(folder)

    folder = _saved(tmp_path / "abstopk", saes.AbsTopKSAE(_cfg(saes.AbsTopKSAEConfig, k=K)))
    with pytest.raises(CheckpointError, match="architecture 'abstopk' is not one sae_fast"):
        SparseAutoencoder.load(folder)

    folder = _saved(tmp_path / "whitened")
    _edit_cfg(folder, normalize_activations="covariance_whitening")
    with pytest.raises(CheckpointError, match="normalize_activations 'covariance_whitening'"):
        SparseAutoencoder.load(folder)

    folder = _saved(
        tmp_path / "fractional-k",
        saes.BatchTopKTrainingSAE(_cfg(saes.BatchTopKTrainingSAEConfig, k=2.5)),
    )
    with pytest.raises(CheckpointError, match="k=2.5 is fractional"):
        SparseAutoencoder.load(folder)

    folder = _saved(tmp_path / "no-b_enc")
    tensors = load_file(folder / "sae_weights.safetensors")
    del tensors["b_enc"]
    save_file(tensors, folder / "sae_weights.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors \['b_enc'\]"):
        SparseAutoencoder.load(folder)

    folder = _saved(tmp_path / "wide")
    _edit_cfg(folder, d_sae=M + 1)
    with pytest.raises(CheckpointError, match=r"'W_dec' has shape \(40, 12\), expected \(41, 12\)"):
        SparseAutoencoder.load(folder)

    folder = _saved(tmp_path / "zero-row")
    tensors = load_file(folder / "sae_weights.safetensors")
    tensors["W_dec"][3] = 0
    save_file(tensors, folder / "sae_weights.safetensors")
    _edit_cfg(folder, rescale_acts_by_decoder_norm=True)
    with pytest.raises(CheckpointError, match="1 decoder rows are zero"):
        SparseAutoencoder.load(folder)


def test_detection_keeps_to_its_own_layout(tmp_path):
    from sae_fast.formats import saelens, sparsify

    ours = SparseAutoencoder(D, M, k=K)
    for name in ("saelens", "sparsify", "sae_fast"):
        ours.save(tmp_path / name, format=name)
        assert formats.detect(tmp_path / name) == name
    assert not saelens.detect(tmp_path / "sparsify") and not saelens.detect(tmp_path / "sae_fast")
    assert not sparsify.detect(tmp_path / "saelens") and not sparsify.detect(tmp_path / "sae_fast")


def test_the_export_says_what_it_was_trained_on_and_which_saelens_it_targets(tmp_path):
    ours = SparseAutoencoder(16, 32, k=4)
    source = {"kind": "model", "context_size": 64}
    ours.provenance = {"model": "gpt2", "hook": "resid_post.3", "text": "c.txt", "source": source}
    ours.save(tmp_path, format="saelens")
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    meta = theirs.cfg.metadata
    assert (meta.model_name, meta.hook_name) == ("gpt2", "blocks.3.hook_resid_post")
    assert (meta.context_size, meta.dataset_path) == (64, "c.txt")
    assert meta.sae_lens_version == saelens_format.SAELENS_VERSION == version("sae-lens")
    assert SparseAutoencoder.load(tmp_path).provenance == ours.provenance  # ours, whole
    # Our alias for the packaged model is ours only: other tools get its Hugging Face id.
    ours.provenance = {**ours.provenance, "model": "minilm"}
    ours.save(tmp_path / "minilm", format="saelens")
    meta = sae_lens.SAE.load_from_disk(tmp_path / "minilm").cfg.metadata
    assert meta.model_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert SparseAutoencoder.load(tmp_path / "minilm").provenance["model"] == "minilm"


def test_saelens_records_become_provenance(tmp_path):
    ours = SparseAutoencoder(16, 32, k=4)
    ours.save(tmp_path, format="saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["metadata"] = {"sae_lens_version": "6.5.0", "model_name": "gemma-2-2b",
                       "hook_name": "blocks.12.hook_mlp_out"}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = SparseAutoencoder.load(tmp_path)
    assert loaded.provenance == {"model": "gemma-2-2b", "hook": "mlp_out.12"}


D_OUT = 9  # a transcoder's output width, other than D
TRANSCODERS = {
    "transcoder": (saes.Transcoder, saes.TranscoderConfig, "relu"),
    "skip_transcoder": (saes.SkipTranscoder, saes.SkipTranscoderConfig, "relu"),
    "jumprelu_transcoder": (saes.JumpReLUTranscoder, saes.JumpReLUTranscoderConfig, "jumprelu"),
    "jumprelu_skip_transcoder": (
        saes.JumpReLUSkipTranscoder,
        saes.JumpReLUSkipTranscoderConfig,
        "jumprelu",
    ),
}


def assert_same_transcoder(theirs: torch.nn.Module, ours: SparseAutoencoder) -> None:
    """Same prediction, latents, and gradients of its MSE to a target (x and the weights)."""
    x = inputs()
    target = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(3))
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hat, out = theirs(x_theirs), ours(x_ours)
    torch.testing.assert_close(out.x_hat, y_hat, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        z_theirs, z_ours = theirs.encode(x), dense(out.code)
    assert torch.equal(z_ours != 0, z_theirs != 0) and (z_ours != 0).any()
    ref.mse(target, y_hat).backward()
    ref.mse(target, out.x_hat).backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=1e-6, rtol=1e-4)
    grads = their_grads(theirs)
    for name, p in ours.named_parameters():
        if name == "log_threshold":  # theirs is a mask: no gradient
            continue
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", list(TRANSCODERS))
def test_saelens_transcoders_load_as_the_same_function(tmp_path, arch):
    cls, cfg_cls, activation = TRANSCODERS[arch]
    cfg = cfg_cls(d_in=D, d_sae=M, d_out=D_OUT, apply_b_dec_to_input=False)
    theirs = randomize(cls(cfg))
    theirs.cfg.metadata.hook_name = "blocks.2.ln2.hook_normalized"
    theirs.cfg.metadata.hook_name_out = "blocks.2.hook_mlp_out"
    theirs.save_model(tmp_path)
    ours = SparseAutoencoder.load(tmp_path)
    assert (ours.transcoder, ours.d_out, ours.activation) == (True, D_OUT, activation)
    assert ours.skip_connection == ("skip" in arch)
    assert (ours.provenance["hook_in"], ours.provenance["hook_out"]) == ("mlp_in.2", "mlp_out.2")
    assert_same_transcoder(theirs, ours)


@pytest.mark.parametrize(
    ("activation", "skip", "arch"),
    [
        ("relu", False, "transcoder"),
        ("relu", True, "skip_transcoder"),
        ("jumprelu", True, "jumprelu_skip_transcoder"),
        ("batchtopk", False, "jumprelu_transcoder"),
    ],
)
def test_our_transcoders_saved_as_saelens_load_in_saelens(tmp_path, activation, skip, arch):
    ours = our_random(activation, transcoder=True, d_out=D_OUT, skip_connection=skip)
    ours.provenance = {"hook_in": "mlp_in.1", "hook_out": "mlp_out.1"}
    ours.eval().save(tmp_path, format="saelens")
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == arch and theirs.cfg.d_out == D_OUT
    assert theirs.cfg.metadata.hook_name_out == "blocks.1.hook_mlp_out"
    if activation != "batchtopk":  # a batchtopk's weights become a JumpReLU's thresholds
        assert_same_transcoder(theirs, ours)
    back = SparseAutoencoder.load(tmp_path)
    assert back.config() == ours.config()
    with torch.no_grad():
        torch.testing.assert_close(back(inputs()).x_hat, theirs(inputs()))


def test_what_saelens_has_no_transcoder_for_is_not_saved(tmp_path):
    topk = SparseAutoencoder(D, M, k=K, transcoder=True, d_out=D_OUT)
    with pytest.raises(CheckpointError, match="no 'topk' transcoder class"):
        topk.save(tmp_path / "topk", format="saelens")
    skip = SparseAutoencoder(D, M, k=K, skip_connection=True)
    with pytest.raises(CheckpointError, match="skip connections on transcoders only"):
        skip.save(tmp_path / "skip", format="saelens")
