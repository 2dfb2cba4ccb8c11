"""The chunked backend against the reference, on CPU under TRITON_INTERPRET=1 (tiny shapes).

Its GEMM is torch.addmm per chunk of latents; the Triton select merges each chunk into the
running top-k. Chunk widths that break the select's tiles and k, ties across chunk borders,
all-negative rows, NaN, k = 1 and k = m, AuxK; forward and every gradient.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from cases import (
    DEVICE,
    assert_auxk_exact,
    assert_within_torch_error,
    encode_decode_grads,
    integer_case,
    runs_here,
    separated_case,
)

from sae_fast import backends, ops
from sae_fast import reference as ref
from sae_fast.backends import triton as triton_backend
from sae_fast.backends.chunked import chunk_for

pytestmark = runs_here("chunked")


def chunked(chunk_size):
    def encode(x, W_enc, b_enc, b_dec, k):
        code = ops.encode_topk(x, W_enc, b_enc, b_dec, k, backend="chunked", chunk_size=chunk_size)
        return tuple(code)

    return encode


def decode(values, indices, W_dec, b_dec):
    return ops.decode(values, indices, W_dec, b_dec, backend="chunked")


# Chunks of 1 latent, of widths that are no multiple of the interpreter's 32-latent tiles
# nor of k, and the whole dictionary in one chunk (None: CHUNK_BYTES's width, all of m here).
SHAPES = {(1, 16, 64, 4): [7, 45, None], (5, 40, 200, 3): [7, 45, None],
          (33, 16, 200, 8): [45, None], (6, 16, 64, 1): [7, None]}  # fmt: skip
CASES = [
    (*shape, chunk, dtype)
    for shape, chunks in SHAPES.items()
    for chunk, dtype in itertools.product(chunks, (torch.float32, torch.float16))
] + [(4, 16, 24, 3, 1, torch.float32), (5, 16, 40, 40, 13, torch.float32)]  # k = m


@pytest.mark.parametrize(("n", "d", "m", "k", "chunk", "dtype"), CASES)
def test_matches_reference(n, d, m, k, chunk, dtype):
    case = separated_case(n, d, m, k, seed=n + d + m, tol=3e-2 if dtype == torch.float16 else 1e-3)
    oracle = encode_decode_grads(ref.encode_topk, ref.decode, case.to(torch.float64, True), k)
    plain = encode_decode_grads(ref.encode_topk, ref.decode, case.to(dtype, True, DEVICE), k)
    ours = encode_decode_grads(chunked(chunk), decode, case.to(dtype, True, DEVICE), k)
    assert ours["values"].dtype == dtype and ours["indices"].dtype == torch.int64
    assert torch.equal(ours["indices"].cpu(), oracle["indices"])
    for name in oracle:
        if name != "indices":
            assert_within_torch_error(ours[name].cpu(), plain[name].cpu(), oracle[name], name)


@pytest.mark.parametrize(("k", "chunk"), [(3, 5), (8, 5), (8, 32), (64, 17)])
def test_ties_across_chunks_and_rows_with_few_positives_exact(k, chunk):
    """Integer data, full of ties that straddle chunk borders; all-negative rows and rows with
    fewer than k positives take zeros at the lowest unused latents. Exact in float32."""
    case = integer_case(13, 16, 64, seed=k + chunk)
    oracle = encode_decode_grads(
        ref.encode_topk, ref.decode, case.to(torch.float64, True), k, integer=True
    )
    ours = encode_decode_grads(
        chunked(chunk), decode, case.to(torch.float32, True, DEVICE), k, integer=True
    )
    for name, want in oracle.items():
        assert torch.equal(ours[name].cpu().to(want.dtype), want), name
    assert torch.equal(ours["indices"][0].cpu(), torch.arange(k))  # all-negative row


def test_a_tie_with_the_threshold_in_a_later_chunk_loses():
    """pre = x exactly: latent 40 (chunk 2) ties the k-th best of chunk 0 (latent 3) and must
    lose to it; latent 41 beats it, ties latent 2 and must come after that one."""
    x = torch.zeros(2, 48, dtype=torch.float64)
    x[:, :16] = torch.arange(16, 0, -1).double()  # k = 4: threshold 13
    x[:, 40], x[:, 41] = 13.0, 14.0
    eye, zeros = torch.eye(48, dtype=torch.float64), torch.zeros(48, dtype=torch.float64)
    want = ref.encode_topk(x, eye, zeros, zeros, 4)
    got = ops.encode_topk(x.float(), eye.float(), zeros.float(), zeros.float(), 4,
                          backend="chunked", chunk_size=16)  # fmt: skip
    assert got.indices.tolist() == [[0, 1, 2, 41]] * 2 == want[1].tolist()
    assert torch.equal(got.values.double(), want[0])


def test_empty_and_non_contiguous_input():
    case = separated_case(6, 16, 64, 4, seed=3).to(torch.float32, device=DEVICE)
    encode = chunked(20)
    empty = encode(case.x[:0], case.W_enc, case.b_enc, case.b_dec, 4)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0, 4)
    strided = torch.zeros(6, 32, device=DEVICE)
    strided[:, ::2] = case.x
    got = encode(strided[:, ::2], case.W_enc, case.b_enc, case.b_dec, 4)
    want = encode(case.x, case.W_enc, case.b_enc, case.b_dec, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_nan_propagates_as_in_the_torch_backend():
    case = separated_case(5, 16, 64, 4, seed=9).to(torch.float32, device=DEVICE)
    x = case.x.clone()
    x[2, 3] = float("nan")  # every pre-activation of row 2 is NaN
    ours = ops.encode_topk(x, case.W_enc, case.b_enc, case.b_dec, 4, backend="chunked",
                           chunk_size=24)  # fmt: skip
    torch_code = ops.encode_topk(x, case.W_enc, case.b_enc, case.b_dec, 4, backend="torch")
    assert ours.values[2].isnan().all() and torch_code.values[2].isnan().all()
    keep = torch.arange(5) != 2  # which latents a row of NaNs names is not defined
    assert torch.equal(ours.indices[keep], torch_code.indices[keep])
    torch.testing.assert_close(ours.values[keep], torch_code.values[keep])


@pytest.mark.parametrize(
    ("k", "k_aux", "dead_every", "chunk"),
    [(3, 5, 3, 7), (8, 1, 3, 64), (4, 6, 32, 5), (4, 3, None, 16), (4, 7, 1, 10)],
)
def test_auxk_code_exact(k, k_aux, dead_every, chunk):
    """From the dead latents alone, chunked the same way: a third of them, two (k_aux above
    their count), none, all."""
    case = integer_case(13, 16, 64, seed=k + k_aux)
    every = torch.arange(64)
    dead = every % dead_every == 0 if dead_every else every < 0
    assert_auxk_exact(case, k, dead, k_aux, DEVICE, backend="chunked", chunk_size=chunk)


def test_is_picked_by_name_only():
    assert "chunked" not in backends.automatic("cpu")
    assert backends.resolve(None, torch.randn(2, 3)).name == "torch"


def test_chunks_stay_within_their_budget():
    """Two buffers of at most CHUNK_BYTES each (8 MiB) at the sizes that matter, whole
    multiples of 128 latents, never fewer than 128 nor more than m."""
    assert chunk_for(4096, 131072, 2) == 1024  # 4096 rows x 1024 bf16 = 8 MiB
    assert chunk_for(4096, 131072, 4) == 512
    assert chunk_for(8, 1000, 4) == 1000
    assert chunk_for(1 << 20, 4096, 4) == 128


def test_a_select_that_cannot_be_built_falls_back_to_torch_with_one_warning(monkeypatch):
    """Only the select refuses (the decoder's kernels still run), and the keys that failed
    are this test's own: the process's fallbacks stay as they were for the other tests."""
    from triton.runtime.errors import OutOfResources

    from sae_fast.kernels import select_topk
    from sae_fast.kernels.fallback import Fallback

    class Refused:
        def run(self):
            raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(select_topk, "plan", lambda *args: Refused())
    fresh = Fallback("select")
    monkeypatch.setattr(triton_backend, "_fallback", lambda what: fresh)
    case = separated_case(5, 16, 64, 4, seed=11).to(torch.float32, True, DEVICE)
    want = encode_decode_grads(ref.encode_topk, ref.decode, case, 4)
    with pytest.warns(RuntimeWarning) as caught:
        for _ in range(2):
            got = encode_decode_grads(chunked(None), decode, case, 4)
    reasons = [str(w.message) for w in caught]
    assert len(reasons) == 1 and "Triton select kernel cannot run here" in reasons[0], reasons
    assert fresh.failed == {(torch.float32, 4)}
    assert torch.equal(got["indices"], want["indices"])
    torch.testing.assert_close(got["values"].double(), want["values"].double())
