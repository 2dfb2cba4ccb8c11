"""The triton backend against the reference, on CPU under TRITON_INTERPRET=1 (tiny shapes).

The interpreter proves indexing, masking and math; races, TF32 tolerances and speed need a
GPU (tests/test_gpu_triton.py).
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from cases import (
    DEVICE,
    Case,
    assert_auxk_exact,
    assert_within_torch_error,
    encode_decode_grads,
    integer_case,
    runs_here,
    separated_case,
)

from sae_fast import backend_status, backends, ops
from sae_fast import reference as ref

pytestmark = runs_here("triton")


def triton_encode(x, W_enc, b_enc, b_dec, k):
    return tuple(ops.encode_topk(x, W_enc, b_enc, b_dec, k, backend="triton"))


def triton_decode(values, indices, W_dec, b_dec):
    return ops.decode(values, indices, W_dec, b_dec, backend="triton")


SHAPES = list(itertools.product([1, 5, 33], [16, 40], [64, 200], [1, 4, 8]))
# k=3 is padded to 4 inside the kernel.
CASES = [(*s, dt) for s in SHAPES for dt in (torch.float32, torch.float16)] + [
    (5, 16, 200, 3, torch.float32)
]


@pytest.mark.parametrize(("n", "d", "m", "k", "dtype"), CASES)
def test_matches_reference(n, d, m, k, dtype):
    case = separated_case(n, d, m, k, seed=n + d + m, tol=3e-2 if dtype == torch.float16 else 1e-3)
    oracle = encode_decode_grads(ref.encode_topk, ref.decode, case.to(torch.float64, True), k)
    plain = encode_decode_grads(ref.encode_topk, ref.decode, case.to(dtype, True, DEVICE), k)
    ours = encode_decode_grads(triton_encode, triton_decode, case.to(dtype, True, DEVICE), k)
    assert ours["values"].dtype == dtype and ours["indices"].dtype == torch.int64
    assert torch.equal(ours["indices"].cpu(), oracle["indices"])
    for name in oracle:
        if name != "indices":
            assert_within_torch_error(ours[name].cpu(), plain[name].cpu(), oracle[name], name)


@pytest.mark.parametrize("k", [3, 8])
def test_ties_and_rows_with_few_positives_exact(k):
    """Integer data: ties, all-negative rows, rows with < k positives; exact in float32."""
    case = integer_case(13, 16, 64, seed=k)
    oracle = encode_decode_grads(
        ref.encode_topk, ref.decode, case.to(torch.float64, True), k, integer=True
    )
    ours = encode_decode_grads(
        triton_encode, triton_decode, case.to(torch.float32, True, DEVICE), k, integer=True
    )
    for name, want in oracle.items():
        assert torch.equal(ours[name].cpu().to(want.dtype), want), name
    assert torch.equal(ours["indices"][0].cpu(), torch.arange(k))  # all-negative row


def test_empty_and_non_contiguous_input():
    case = separated_case(6, 16, 64, 4, seed=3).to(torch.float32, device=DEVICE)
    empty = ops.encode_topk(case.x[:0], case.W_enc, case.b_enc, case.b_dec, 4, backend="triton")
    assert empty.values.shape == (0, 4) and empty.indices.shape == (0, 4)
    assert triton_decode(*empty, case.W_dec, case.b_dec).shape == (0, 16)
    strided = torch.zeros(6, 32, device=DEVICE)
    strided[:, ::2] = case.x
    got = ops.encode_topk(strided[:, ::2], case.W_enc, case.b_enc, case.b_dec, 4, backend="triton")
    want = ops.encode_topk(case.x, case.W_enc, case.b_enc, case.b_dec, 4, backend="triton")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


def test_triton_is_never_picked_automatically_for_cpu_tensors():
    assert backends.resolve(None, torch.randn(2, 3)).name == "torch"


def test_reason_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backend_status("cpu")["triton"]
    assert (
        reason == "Triton kernels run on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    )
    with pytest.raises(backends.BackendUnavailableError, match="'triton' .*cannot run on cpu"):
        ops.encode_topk(torch.randn(2, 4), torch.randn(8, 4), torch.zeros(8), torch.zeros(4), 2,
                        backend="triton")  # fmt: skip


@pytest.mark.parametrize(
    ("k", "k_aux", "dead_every"),
    [(3, 5, 3), (8, 1, 3), (4, 6, 32), (4, 3, None), (4, 7, 1)],
)
def test_auxk_code_exact(k, k_aux, dead_every):
    """From the dead latents alone: a third of them, two (k_aux above their count), none,
    all; the zeros of the code land on the lowest free latents, dead or live."""
    case = integer_case(13, 16, 64, seed=k + k_aux)
    every = torch.arange(64)
    dead = every % dead_every == 0 if dead_every else every < 0
    assert_auxk_exact(case, k, dead, k_aux, DEVICE, backend="triton")


def identity_case(x: torch.Tensor) -> Case:
    """pre = x exactly: W_enc and W_dec the identity (m = x's width), biases 0."""
    m = x.shape[1]
    eye = torch.eye(m, dtype=x.dtype)
    zeros = torch.zeros(m, dtype=x.dtype)
    return Case(x, eye, zeros, zeros, eye)


def staged_case(k: int) -> Case:
    """pre = x exactly (W_enc the identity, biases 0), integers laid out so that the kernel
    takes every selection path: the first tile of each split a full top-k, the next tile of
    split 0 the light top-8 (one to three keys of a row beat its k-th, one of them tying it),
    the last tile nothing; ties between latents throughout."""
    n, m = 6, 96  # tiles of 32 under the interpreter; 2 splits of 48
    g = torch.Generator().manual_seed(k)
    x = torch.zeros(n, m, dtype=torch.float64)
    x[:, :32] = torch.randint(20, 40, (n, 32), generator=g).double()
    kth = x[:, :32].sort(dim=1, descending=True).values[:, k - 1]
    x[:, 32:48] = torch.randint(0, 10, (n, 16), generator=g).double()
    for r in range(n):
        x[r, 33 : 34 + r % 3] = kth[r] + 1  # beats the threshold
        x[r, 40] = kth[r]  # ties it: a higher index than every tied key so far, so it loses
    x[:, 48:80] = torch.randint(-5, 50, (n, 32), generator=g).double()
    x[:, 80:] = -1.0
    return identity_case(x)


def buffered_case(k: int) -> Case:
    """pre = x exactly, 10 tiles of 32 in 2 splits: in split 0 light tiles of 7 new keys a row
    overflow the 16-key buffer; in split 1 a full tile arrives with the buffer holding keys."""
    n, m = 4, 320
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 10, (n, m), generator=g).double()
    for split in (0, 160):
        x[:, split : split + 32] = torch.randint(20, 40, (n, 32), generator=g).double()
    for tile in range(1, 5):  # split 0: 7 keys above everything before them, in each tile
        start = 32 * tile
        x[:, start : start + 7] = 100 + 10 * tile + torch.arange(7).double()
    x[:, 192:197] = 60.0  # split 1, tile 1: light (5 keys, tied)
    x[:, 224:236] = 70.0 + torch.arange(12).double()  # tile 2: full, the buffer holding 5
    x[:, 256:259] = 90.0  # tile 3: light again
    return identity_case(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("k", "build"), [(12, staged_case), (16, staged_case),
                                          (16, buffered_case), (32, buffered_case)])  # fmt: skip
def test_every_selection_path_exact(k, build, dtype):
    """k > 8 makes the light top-8 a separate path from the full top-k (k=12: KP=16 > k)."""
    case = build(k)
    oracle = ref.encode_topk(case.x, case.W_enc, case.b_enc, case.b_dec, k)
    got = ops.encode_topk(*case.to(dtype, device=DEVICE).tensors()[:4], k, backend="triton")
    assert torch.equal(got.indices.cpu(), oracle[1])
    assert torch.equal(got.values.cpu().double(), oracle[0])


def test_nan_propagates_as_in_the_torch_backend():
    case = separated_case(5, 16, 64, 4, seed=9).to(torch.float32, device=DEVICE)
    x = case.x.clone()
    x[2, 3] = float("nan")  # every pre-activation of row 2 is NaN
    ours = ops.encode_topk(x, case.W_enc, case.b_enc, case.b_dec, 4, backend="triton")
    torch_code = ops.encode_topk(x, case.W_enc, case.b_enc, case.b_dec, 4, backend="torch")
    assert ours.values[2].isnan().all() and torch_code.values[2].isnan().all()
    keep = torch.arange(5) != 2  # which latents a row of NaNs names is not defined
    assert torch.equal(ours.indices[keep], torch_code.indices[keep])
    torch.testing.assert_close(ours.values[keep], torch_code.values[keep])


def test_a_kernel_that_cannot_be_built_falls_back_to_torch_with_one_warning(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from sae_fast.kernels import decode as decode_kernels
    from sae_fast.kernels import encode_topk

    def refuse(*args, **kwargs):
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(encode_topk.Launch, "run", refuse)
    monkeypatch.setattr(decode_kernels, "_launch", refuse)
    case = separated_case(5, 16, 64, 4, seed=11).to(torch.float32, True, DEVICE)
    want = encode_decode_grads(ref.encode_topk, ref.decode, case, 4)
    with pytest.warns(RuntimeWarning) as caught:
        for _ in range(2):
            got = encode_decode_grads(triton_encode, triton_decode, case, 4)
    reasons = [str(w.message) for w in caught]
    assert len(reasons) == 3, reasons  # encoder, gather_sum, pair_dot: once each
    assert all("OutOfResources" in r and "shared memory" in r for r in reasons)
    assert torch.equal(got["indices"], want["indices"])
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name].double())


def test_a_failed_compiler_pass_falls_back_and_other_errors_do_not():
    """Triton reports a crashed MLIR pass as a plain RuntimeError: that one means the kernel
    cannot be built here; any other error is the caller's to see."""
    from sae_fast.kernels.fallback import Fallback

    def fails(message):
        def kernel():
            raise RuntimeError(message)

        return kernel

    fallback = Fallback("test")
    with pytest.warns(RuntimeWarning, match="PassManager::run failed"):
        assert fallback("a", fails("PassManager::run failed"), lambda: "torch") == "torch"
    assert fallback("a", fails("not reached: the key failed before"), lambda: 1) == 1
    with pytest.raises(RuntimeError, match="an illegal memory access"):
        fallback("b", fails("an illegal memory access"), lambda: "torch")


def test_training_with_default_auxk_runs_on_the_triton_backend(tmp_path):
    """The trainer's defaults (k_aux = d/2) with AuxK active: the dead latents' code comes
    from the dead rows alone, with no Triton top-k_aux to build."""
    from sae_fast.sources import SyntheticSource
    from sae_fast.training import TrainConfig, Trainer

    def run(backend):
        cfg = TrainConfig(
            source="synthetic", n_latents=256, k=3, steps=8, batch_size=64, lr=3e-3,
            lr_warmup_steps=2, init_tokens=128, dead_tokens=64, log_every=1, checkpoint_every=0,
            backend=backend, device=DEVICE, out_dir=str(tmp_path / backend), progress=False,
            plots=False,
        )  # fmt: skip
        data = SyntheticSource(d_in=16, n_features=32, k_active=3, seed=3)
        trainer = Trainer(cfg, data)
        trainer.train()
        return trainer, [json.loads(line) for line in open(tmp_path / backend / "metrics.jsonl")]

    ours, rows = run("triton")
    _, torch_rows = run("torch")
    assert ours.weights.k_aux == 8 and any("auxk" in row for row in rows)
    for row, want in zip(rows, torch_rows, strict=True):
        for name in ("loss", "fvu", "auxk"):
            if name in want:
                assert row[name] == pytest.approx(want[name], rel=1e-3, abs=1e-5), (row, want)
