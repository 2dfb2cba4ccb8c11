"""The Triton kernels compile for a Hopper GPU (sm_90) without one: triton lowers them to
PTX and its bundled ptxas to a cubin. This catches what the interpreter cannot: globals a
kernel may not read, types the compiler rejects, unsupported ops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sae_fast.kernels.decode import _gather_sum_kernel, _pair_dot_kernel
from sae_fast.kernels.encode_topk import _encode_topk_kernel

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types, constexprs, **options):
    signature = {
        name: "constexpr" if name in constexprs else types.get(name, "i32")
        for name in fn.arg_names
    }
    triton.compile(ASTSource(fn, signature, constexprs), target=TARGET, options=options)
    print("compiled", fn.__name__, {k: v for k, v in constexprs.items() if k != "IEEE"})


def encode_types(dtype):
    floats = dict.fromkeys(("X", "W", "B_ENC", "B_DEC"), dtype)
    return {**floats, "KEYS": "*i64", "DEAD": "*i8", "AUX_KEYS": "*i64"}


tiles = {"BLOCK_N": 64, "BLOCK_M": 128, "BLOCK_D": 64}
compile_kernel(
    _encode_topk_kernel, encode_types("*bf16"),
    {"KP": 64, "KAP": 32, "HAS_AUX": True, "IEEE": False, **tiles}, num_warps=8, num_stages=3,
)
compile_kernel(
    _encode_topk_kernel, encode_types("*fp32"),
    {"KP": 8, "KAP": 1, "HAS_AUX": False, "IEEE": True, **tiles}, num_warps=4, num_stages=3,
)
blocks = {"BLOCK_K": 32, "BLOCK_D": 128}
floats = {"V": "*bf16", "W": "*bf16", "B": "*bf16", "OUT": "*bf16", "G": "*bf16"}
compile_kernel(_gather_sum_kernel, {**floats, "IDX": "*i64"}, blocks)
compile_kernel(_pair_dot_kernel, {**floats, "IDX": "*i64", "OUT": "*fp32"}, blocks)
"""


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == 4, out.stdout


def test_autotune_configs_fit_k():
    """tl.topk needs BLOCK_M >= the padded k; the running top-k must fit the registers."""
    from sae_fast.kernels import encode_topk

    configs = encode_topk._configs()
    for kp, kap in [(1, 1), (64, 1), (256, 1), (64, 256)]:
        kept = encode_topk._prune(configs, {}, KP=kp, KAP=kap)
        widest = max(kp, kap)
        assert kept
        assert all(c.kwargs["BLOCK_M"] >= widest for c in kept)
        assert all(c.kwargs["BLOCK_N"] * widest <= 8192 for c in kept)
    assert len(encode_topk._prune(configs, {}, KP=64, KAP=1)) > 1  # a real choice to tune
