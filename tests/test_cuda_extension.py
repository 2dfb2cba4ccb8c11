"""The CUDA extension sae_fast._C: it builds and imports here; its kernels run on a GPU.

Without a GPU, the latent-major index that drives its kernels is checked through a Python
model of its two scatter_sum kernels (same items, same order), against a dense reference.
"""

from __future__ import annotations

import importlib
import shutil

import pytest
import torch
from cases import assert_auxk_exact, encode_decode_grads, integer_case, separated_case

from sae_fast import backends, ops
from sae_fast import reference as ref
from sae_fast.backends import cuda as cuda_backend


def test_extension_builds_and_imports_where_nvcc_is():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: setup.py installs without the extension")
    ext = importlib.import_module("sae_fast._C")
    for name in ("scatter_sum", "pair_dot", "gather_sum"):
        assert callable(getattr(ext, name)), name
    assert ext.DTYPES == {"float32": 0, "float16": 1, "bfloat16": 2}
    cuda = backends.get("cuda")
    assert cuda.why_not_on(torch.device("cpu"), torch.float32) == (
        "the cuda backend runs on cuda tensors, not cpu"
    )


def test_extension_takes_named_arguments_only():
    """The C++ boundary names every argument; empty work returns before touching a GPU."""
    ext = pytest.importorskip("sae_fast._C")
    sizes = {"n": 0, "k": 4, "d": 8, "dtype": 0, "stream": 0}
    ext.gather_sum(out=0, W=0, coeff=0, indices=0, **sizes)
    ext.pair_dot(out=0, W=0, g=0, indices=0, g_stride=8, **sizes)
    pointers = ("out", "workspace", "rows", "coeff", "token", "item_latent", "item_start")
    pointers += ("item_end", "item_slot", "split_latent", "split_start", "split_end")
    ext.scatter_sum(
        **dict.fromkeys(pointers, 0), items=0, split_latents=0, d=8, row_stride=8,
        accumulate=False, out_dtype=0, dtype=0, stream=0,
    )  # fmt: skip
    with pytest.raises(TypeError):
        ext.gather_sum(0, 0, 0, 0, 0, 4, 8, 0, 0)
    with pytest.raises(TypeError):
        ext.pair_dot(out=0, W=0, g=0, idx=0, g_stride=8, **sizes)


def test_python_side_passes_the_names_the_extension_takes(monkeypatch):
    """The cuda backend's wrappers call sae_fast._C by keyword: with no pairs the kernels
    launch nothing, so the real extension checks every name here, without a GPU."""
    pytest.importorskip("sae_fast._C")
    monkeypatch.setattr(cuda_backend, "_stream", lambda device: 0)
    W, rows = torch.randn(10, 6), torch.randn(0, 6)
    coeff, indices = torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64)
    assert cuda_backend.gather_sum(W, coeff, indices).shape == (0, 6)
    assert cuda_backend.pair_dot(W, rows, indices).shape == (0, 3)
    assert torch.equal(cuda_backend.scatter_sum(W, coeff, indices, rows), torch.zeros(10, 6))
    out = torch.ones(10, 6)
    assert cuda_backend.scatter_sum(W, coeff, indices, rows, out) is out
    held = torch.ones(10, 6)  # a 16-bit W's sums held in fp32
    assert cuda_backend.scatter_sum(W.bfloat16(), coeff, indices, rows, held) is held
    with pytest.raises(ValueError, match="out_dtype must be dtype or 0"):
        cuda_backend.scatter_sum(W.bfloat16(), coeff, indices, rows, out.half())


def model_scatter_sum(index, coeff, rows):
    """What scatter_sum_kernel + reduce_partials_kernel compute, item by item, in order; the
    entries that name latent -1 (past the real ones) are skipped, as the kernels skip them."""
    coeff = coeff.reshape(-1)[index.order].double()
    out = torch.zeros(index.n_latents, rows.shape[1], dtype=torch.float64)
    workspace = torch.zeros(index.workspace_rows, rows.shape[1], dtype=torch.float64)
    for item in range(index.item_latent.numel()):
        if index.item_latent[item] < 0:
            continue
        lo, hi = int(index.item_start[item]), int(index.item_end[item])
        acc = (coeff[lo:hi, None] * rows[index.token[lo:hi]].double()).sum(dim=0)
        slot = int(index.item_slot[item])
        if slot < 0:
            out[index.item_latent[item]] = acc
        else:
            workspace[slot] = acc
    for i in range(index.split_latent.numel()):
        if index.split_latent[i] < 0:
            continue
        lo, hi = int(index.split_start[i]), int(index.split_end[i])
        out[index.split_latent[i]] = workspace[lo:hi].sum(dim=0)
    return out


def test_latent_index_covers_every_pair_once_even_for_a_hot_latent(monkeypatch):
    monkeypatch.setattr(cuda_backend, "ITEM_PAIRS", 8)
    n, k, m, d = 40, 3, 50, 6
    g = torch.Generator().manual_seed(0)
    # Distinct latents per row, 7 in none of them; then latent 7 for 30 tokens: 4 items of 8.
    indices = torch.stack([torch.randperm(m - 1, generator=g)[:k] for _ in range(n)])
    indices += (indices >= 7).long()
    indices[:30, 0] = 7
    coeff, rows = torch.randn(n, k, generator=g), torch.randn(n, d, generator=g)
    index = cuda_backend.LatentIndex.build(indices, m)
    latent_of_item = index.item_latent.tolist()
    assert latent_of_item.count(7) == 4
    assert [latent for latent in index.split_latent.tolist() if latent >= 0] == [7]
    sizes = (index.item_end - index.item_start).tolist()
    assert sum(sizes) == n * k and max(sizes) <= 8
    # Pairs of a latent stay in token order: the stable sort keeps the result deterministic.
    tokens_of_7 = index.token[index.item_start[latent_of_item.index(7)] :][:30]
    assert tokens_of_7.tolist() == list(range(30))
    dense = torch.zeros(n, m, dtype=torch.float64).scatter(1, indices, coeff.double())
    torch.testing.assert_close(model_scatter_sum(index, coeff, rows), dense.T @ rows.double())


@pytest.mark.parametrize("seed", range(4))
def test_latent_index_of_random_codes_matches_the_dense_sum(monkeypatch, seed):
    """Skewed latents, many split into items of 4 pairs; what the kernels do, modelled."""
    monkeypatch.setattr(cuda_backend, "ITEM_PAIRS", 4)
    g = torch.Generator().manual_seed(seed)
    n, k, m, d = 37, 5, 23, 3
    rows_of_latents = []
    for row in range(n):  # distinct latents a row; latents 0, 1, 2 hot in the first half
        order = torch.randperm(m, generator=g)
        if row < n // 2:
            order = torch.cat([torch.tensor([row % 3]), order[order != row % 3]])
        rows_of_latents.append(order[:k])
    indices = torch.stack(rows_of_latents)
    coeff, rows = torch.randn(n, k, generator=g), torch.randn(n, d, generator=g)
    index = cuda_backend.LatentIndex.build(indices, m)
    dense = torch.zeros(n, m, dtype=torch.float64).scatter(1, indices, coeff.double())
    torch.testing.assert_close(model_scatter_sum(index, coeff, rows), dense.T @ rows.double())
    # The real entries come first, and the sizes of every array follow from (n, k, m) alone:
    # nothing in building it waits for the device.
    real = index.item_latent >= 0
    assert not real[real.long().sum() :].any()
    assert (index.item_end - index.item_start)[real].sum() == n * k
    other = cuda_backend.LatentIndex.build(torch.zeros_like(indices), m)
    for name in cuda_backend.LatentIndex.KERNEL_ARGS:
        assert getattr(other, name).shape == getattr(index, name).shape, name


def test_latent_index_is_cached_for_the_same_indices_only():
    indices = torch.randint(0, 20, (6, 2))
    first = cuda_backend.latent_index(indices, 20)
    assert cuda_backend.latent_index(indices, 20) is first
    aux = torch.randint(0, 20, (6, 3))  # the AuxK code's, built in between: both stay cached
    assert cuda_backend.latent_index(aux, 20) is cuda_backend.latent_index(aux, 20)
    assert cuda_backend.latent_index(indices, 20) is first
    assert cuda_backend.latent_index(indices.clone(), 20) is not first
    indices.add_(0)  # an in-place write bumps the version: no stale reuse
    assert cuda_backend.latent_index(indices, 20) is not first


def cuda_encode(x, W_enc, b_enc, b_dec, k):
    return tuple(ops.encode_topk(x, W_enc, b_enc, b_dec, k, backend="cuda"))


def cuda_decode(values, indices, W_dec, b_dec):
    return ops.decode(values, indices, W_dec, b_dec, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "d", "m", "k"), [(1, 96, 300, 3), (129, 100, 1000, 16), (77, 130, 517, 64)]
)
def test_gpu_every_gradient_matches_reference(n, d, m, k, dtype):
    case = separated_case(n, d, m, k, seed=m, tol=3e-2 if dtype != torch.float32 else 1e-3)
    oracle = encode_decode_grads(ref.encode_topk, ref.decode, case.to(torch.float64, True), k)
    ours = encode_decode_grads(cuda_encode, cuda_decode, case.to(dtype, True, "cuda"), k)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    for name in oracle:
        if name != "indices":
            torch.testing.assert_close(ours[name].cpu().double(), oracle[name], rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_skewed_latents_exact_and_deterministic():
    """Integer data where latent choices pile up; results exact and bitwise repeatable."""
    case = integer_case(600, 64, 40, seed=1)
    oracle = encode_decode_grads(ref.encode_topk, ref.decode, case.to(torch.float64, True), 8, True)
    runs = [
        encode_decode_grads(cuda_encode, cuda_decode, case.to(torch.float32, True, "cuda"), 8, True)
        for _ in range(3)
    ]
    for name, want in oracle.items():
        assert torch.equal(runs[0][name].cpu().to(want.dtype), want), name
        assert all(torch.equal(r[name], runs[0][name]) for r in runs[1:]), name


@pytest.mark.gpu
def test_gpu_backward_allocates_no_n_by_m_or_n_k_d_tensor():
    n, d, m, k = 4096, 512, 32768, 64
    case = separated_case(8, d, m, k).to(torch.bfloat16, True, "cuda")
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    code = ops.encode_topk(x, case.W_enc, case.b_enc, case.b_dec, k, backend="cuda")
    x_hat = ops.decode(*code, case.W_dec, case.b_dec, backend="cuda")
    loss = (x_hat.float() - x.float()).pow(2).sum()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss.backward()
    torch.cuda.synchronize()
    extra_elements = (torch.cuda.max_memory_allocated() - before) / 2
    assert extra_elements < min(n * m, n * k * d) / 2


@pytest.mark.gpu
def test_gpu_latent_index_builds_without_waiting_for_the_device():
    indices = torch.randint(0, 4096, (512, 32), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_backend.LatentIndex.build(indices, 4096)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_kernels_run_on_their_tensors_device():
    case = separated_case(33, 64, 300, 8, seed=5).to(torch.float32, True, "cuda:1")
    oracle = encode_decode_grads(ref.encode_topk, ref.decode, case.to(torch.float64, True), 8)
    with torch.cuda.device(0):
        ours = encode_decode_grads(cuda_encode, cuda_decode, case, 8)
    for name in oracle:
        if name != "indices":
            torch.testing.assert_close(
                ours[name].cpu().double(), oracle[name], rtol=1e-3, atol=1e-3
            )


@pytest.mark.gpu
@pytest.mark.parametrize(("k", "k_aux"), [(3, 5), (8, 64)])
def test_gpu_auxk_gradients_exact(k, k_aux):
    """Both codes of one pass: each code's latent-major sums on its own index, the AuxK
    code's added to the TopK code's."""
    case = integer_case(300, 64, 96, seed=k)
    dead = torch.arange(96) % 2 == 0
    assert_auxk_exact(case, k, dead, k_aux, "cuda", backend="cuda")


@pytest.mark.gpu
def test_gpu_two_codes_round_a_16_bit_gradient_once():
    """257 pairs of one code and 1 of the other on latent 0: 258 in bfloat16, where rounding
    the first code's sum (256) before adding the second's would give 256."""
    n, d, m = 258, 8, 4
    x = torch.ones(n, d, dtype=torch.bfloat16, device="cuda")
    W_enc = torch.zeros(m, d, dtype=torch.bfloat16, device="cuda")
    b_dec = torch.zeros(d, dtype=torch.bfloat16, device="cuda")
    code = (torch.ones_like(x[:, :1]), torch.zeros(n, 1, dtype=torch.int64, device="cuda"))
    first = torch.ones_like(x[:, :1])
    first[-1] = 0
    needs = (False, True, True, False)
    _, grad_W, grad_b, _ = cuda_backend.encoder_backward(
        needs, x, W_enc, b_dec, [code, code], [first, 1 - first]
    )
    assert grad_W.dtype == grad_b.dtype == torch.bfloat16
    assert torch.equal(grad_W[0].float().cpu(), torch.full((d,), 258.0))
    assert grad_b[0].item() == 258.0 and not grad_W[1:].any() and not grad_b[1:].any()
