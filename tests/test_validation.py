"""Bad input to the functional API raises an error that names the argument."""

from __future__ import annotations

import pytest
import torch

from sae_fast import decode, encode_topk, encode_topk_auxk, options

N, D, M, K = 4, 6, 10, 3


def good():
    return {
        "x": torch.randn(N, D),
        "W_enc": torch.randn(M, D),
        "b_enc": torch.randn(M),
        "b_dec": torch.randn(D),
        "k": K,
    }


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"x": torch.randn(N, D, 1)}, ValueError, r"x must have rank 2, got shape \(4, 6, 1\)"),
        ({"x": torch.randn(N, D + 1)}, ValueError, r"x has d=7 features but W_enc has shape"),
        ({"x": torch.ones(N, D, dtype=torch.int64)}, TypeError, "x must be a floating-point"),
        ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor"),
        ({"W_enc": torch.randn(M * D)}, ValueError, "W_enc must have rank 2"),
        ({"b_enc": torch.randn(M + 1)}, ValueError, r"b_enc must have shape \(10,\)"),
        ({"b_dec": torch.randn(D - 1)}, ValueError, r"b_dec must have shape \(6,\)"),
        ({"b_dec": torch.randn(1, D)}, ValueError, "b_dec must have rank 1"),
        ({"k": 0}, ValueError, "k must satisfy 1 <= k <= n_latents=10, got 0"),
        ({"k": M + 1}, ValueError, "k must satisfy 1 <= k <= n_latents=10, got 11"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        (
            {"W_enc": torch.randn(M, D, dtype=torch.float64)},
            TypeError,
            "x has torch.float32, W_enc has",
        ),
        ({"b_enc": torch.randn(M).half()}, TypeError, "dtype mismatch: x has .*b_enc has"),
        (
            {"b_dec": torch.randn(D, device="meta")},
            ValueError,
            "device mismatch: x is on cpu, b_dec",
        ),
    ],
)
def test_encode_errors(change, error, message):
    args = {**good(), **change}
    with pytest.raises(error, match=message):
        encode_topk(**args)


def test_chunk_size_error():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        encode_topk(**good(), chunk_size=0)


def good_decode():
    return {
        "values": torch.rand(N, K),
        "indices": torch.randint(0, M, (N, K)),
        "W_dec": torch.randn(M, D),
        "b_dec": torch.randn(D),
    }


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"values": torch.rand(N)}, ValueError, "values must have rank 2"),
        ({"values": torch.ones(N, K, dtype=torch.int32)}, TypeError, "values must be a floating"),
        ({"indices": torch.randint(0, M, (N, K)).float()}, TypeError, "indices must be int64"),
        ({"indices": torch.randint(0, M, (N, K + 1))}, ValueError, "indices shape .* must equal"),
        ({"indices": torch.full((N, K), M)}, ValueError, r"indices must lie in \[0, 10\)"),
        ({"indices": torch.full((N, K), -1)}, ValueError, r"indices must lie in \[0, 10\)"),
        ({"W_dec": torch.randn(M, D).double()}, TypeError, "values has torch.float32, W_dec has"),
        ({"b_dec": torch.randn(D + 2)}, ValueError, r"b_dec must have shape \(6,\)"),
    ],
)
def test_decode_errors(change, error, message):
    args = {**good_decode(), **change}
    with pytest.raises(error, match=message):
        decode(**args)


@pytest.mark.parametrize(
    ("dead_mask", "k_aux", "error", "message"),
    [
        (torch.ones(M + 1, dtype=torch.bool), 2, ValueError, r"dead_mask must have shape \(10,\)"),
        (torch.ones(M), 2, TypeError, "dead_mask must be a bool tensor"),
        (
            torch.ones(M, dtype=torch.bool),
            0,
            ValueError,
            "k_aux must satisfy 1 <= k_aux <= n_latents=10",
        ),
        (torch.ones(M, dtype=torch.bool, device="meta"), 2, ValueError, "dead_mask is on meta"),
    ],
)
def test_auxk_errors(dead_mask, k_aux, error, message):
    with pytest.raises(error, match=message):
        encode_topk_auxk(**good(), dead_mask=dead_mask, k_aux=k_aux)


@pytest.mark.parametrize(
    "text", ["\u00b2", "\u0663", "\uff18", "1\u0660", "", " ", "1.0", "0x10", "1_000"]
)
def test_options_read_numbers_in_ascii_digits_only(text):
    assert not options.is_natural(text)
    with pytest.raises(ValueError, match="expected an integer in digits 0-9"):
        options.integer(text)
    with pytest.raises(ValueError, match="expected a number like"):
        options.decimal(text + "\u0660" if text[:1].isascii() else text)
    # A range of hook points in other digits is a name, not a range.
    assert options.parse_hooks(f"resid_post.{text}-\u0661") == [f"resid_post.{text}-\u0661"]


@pytest.mark.parametrize(("text", "value"), [("7", 7), ("-3", -3), ("+12", 12), (" 5 ", 5)])
def test_ascii_integers_parse(text, value):
    assert options.integer(text) == value
    assert options.decimal(text) == value
    assert options.decimal("1e-4") == 1e-4 and options.decimal(".5") == 0.5
    assert options.parse_hooks("resid_post.1-2") == ["resid_post.1", "resid_post.2"]
