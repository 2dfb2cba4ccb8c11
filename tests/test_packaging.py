"""The installed package: kernels/ is sae_fast.kernels, never a top-level `kernels`.

Python run from the root of a checkout puts that root first on sys.path, beside the folder
kernels/; the top-level name belongs to Hugging Face's `kernels`, which transformers imports.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import sae_fast

REPO = Path(__file__).resolve().parents[1]


def python(code: str, *flags: str, cwd: Path, pythonpath: Path | None = None) -> str:
    """stdout of a fresh interpreter running code in cwd (asserting it succeeded)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_kernels_is_a_subpackage():
    module = importlib.import_module("sae_fast.kernels")
    assert Path(module.__file__).parent.name == "kernels"
    assert module.__name__ == "sae_fast.kernels"


PROBE = """
import importlib.metadata as md, importlib.util as u, sae_fast.kernels as k
print(k.__name__)
print(u.find_spec("kernels"))
print(sorted({f.parts[0] for f in md.files("sae-fast") or []}))
print(md.distribution("sae-fast").read_text("top_level.txt").split())
"""


def test_no_top_level_kernels_module_installed(tmp_path):
    # A fresh interpreter outside the checkout sees only what is installed.
    name, spec, file_roots, top_level = python(PROBE, cwd=tmp_path).splitlines()
    assert name == "sae_fast.kernels"
    assert spec == "None" or str(REPO / "kernels") not in spec
    assert "'kernels'" not in file_roots
    assert "'kernels'" not in top_level


BESIDE = """
import importlib.metadata as md, importlib.util, json, os, sys
import transformers.activations  # imports Hugging Face's kernels when it is installed
import kernels
import sae_fast.kernels as ours
print(json.dumps({
    "path": [os.path.realpath(p or os.curdir) for p in sys.path],
    "kernels": os.path.realpath(kernels.__file__),
    "owner": os.path.realpath(md.distribution("kernels").locate_file("kernels/__init__.py")),
    "same": sys.modules["kernels"] is kernels,
    "ours": [ours.__name__, ours.interpreting.__module__],
    "stray": importlib.util.find_spec("kernels.encode_topk") is not None,
}))
"""


@pytest.mark.parametrize("launch", ["cwd", "pythonpath"])
def test_hugging_face_kernels_imports_beside_a_checkout(tmp_path, launch):
    """transformers and `import kernels` get Hugging Face's package, sae_fast.kernels ours,
    with the checkout's root on sys.path ahead of site-packages: as `python`, `python -m pytest`
    and `python -m sae_fast` put it there when run from the root (cwd), or as PYTHONPATH does."""
    for package in ("transformers", "kernels"):
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{package} is not installed (the dev and train extras install it)")
    if launch == "cwd":
        seen = json.loads(python(BESIDE, cwd=REPO))
    else:
        seen = json.loads(python(BESIDE, cwd=tmp_path, pythonpath=REPO))
    owner = Path(seen["owner"])
    searched = [Path(p) for p in seen["path"]]
    assert searched.index(REPO) < searched.index(owner.parents[1])
    assert Path(seen["kernels"]) == owner
    assert seen["same"]
    assert seen["ours"] == ["sae_fast.kernels", "sae_fast.kernels"]
    assert not seen["stray"]


ALONE = """
import json, sys
sys.path.insert(0, CHECKOUT)
errors = []
for name in ("kernels", "kernels.encode_topk", "kernels.launch"):
    try:
        __import__(name)
    except ModuleNotFoundError as e:
        errors.append([e.name, str(e)])
print(json.dumps({"errors": errors, "loaded": [m for m in sys.modules if m.startswith("kernels")]}))
"""


def test_a_checkout_never_imports_its_kernels_as_a_top_level_package(tmp_path):
    """Where nothing else owns the name (-S: no site-packages), `import kernels` from the
    checkout fails as if kernels/ were not there, and no kernel module is loaded as kernels.*."""
    seen = json.loads(python(ALONE.replace("CHECKOUT", repr(str(REPO))), "-S", cwd=tmp_path))
    assert [name for name, _ in seen["errors"]] == ["kernels"] * 3
    assert all("sae_fast.kernels" in message for _, message in seen["errors"])
    assert seen["loaded"] == []


def test_public_api():
    for name in sae_fast.__all__:
        assert hasattr(sae_fast, name), name


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as where it is not installed: its import fails
import torch
import sae_fast
from sae_fast.cli import main

assert main(["train", "--source", "synthetic", "--steps", "3", "--n-latents", "64", "--k", "4",
             "--batch-size", "64", "--init-tokens", "64", "--no-progress", "--no-plots",
             "--out-dir", sys.argv[1]]) == 0
sae = sae_fast.SparseAutoencoder.load(sys.argv[1] + "/sae")
x = torch.randn(8, sae.d_in)
assert torch.equal(sae(x).x_hat, sae(x).x_hat)
status = sae_fast.backend_status()
print(status["triton"])
"""


def test_without_triton_the_cpu_path_trains_and_the_backend_says_why(tmp_path):
    """triton is an extra (CUDA builds of torch bring it): without it a CPU run trains, and
    asking for the Triton backend names the missing import."""
    env = {"TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRITON, str(tmp_path / "run")],
        cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "triton does not import: ModuleNotFoundError" in out.stdout.splitlines()[-1]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [r for r in project["dependencies"] if r.startswith("triton")]
    assert project["optional-dependencies"]["triton"] == ["triton>=3.0"]
