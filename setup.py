"""Build script: metadata lives in pyproject.toml; this file builds the CUDA extension.

sae_fast._C (csrc/) is plain CUDA C++ and pybind11, linked to the static CUDA runtime and not
to libtorch, so it builds against any torch and on machines without a GPU.

Env switches:
  SAE_FAST_BUILD_CUDA=auto|0|1   auto (default): build when nvcc is found, warn and install
                                 the rest if that fails; 1: a failed build is an error; 0: skip
  SAE_FAST_CUDA_ARCHS="80;90"    compute capabilities to build for (PTX of the last is added)
  CUDA_HOME                      the CUDA toolkit (default: found from nvcc)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
MODE = os.environ.get("SAE_FAST_BUILD_CUDA", "auto")


def cuda_home(nvcc: str) -> Path:
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    for candidate in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        if (candidate / "include" / "cuda_runtime.h").is_file():
            return candidate
    raise RuntimeError(f"no CUDA toolkit found beside {nvcc}; set CUDA_HOME")


def gencode_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("SAE_FAST_CUDA_ARCHS", "80;90").split(";") if a]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"SAE_FAST_CUDA_ARCHS must look like '80;90', got {archs!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [*flags, f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


class BuildWithNvcc(build_ext):
    """Compiles the .cu sources with nvcc, the rest with the host compiler, links them."""

    def build_extension(self, ext: Extension) -> None:
        try:
            self._build(ext)
        except Exception as e:
            if MODE == "1":
                raise
            warnings.warn(
                f"sae_fast: CUDA extension not built ({e}); installing without it", stacklevel=1
            )

    def _build(self, ext: Extension) -> None:
        nvcc = shutil.which("nvcc")
        home = cuda_home(nvcc)
        objects = []
        for source in [s for s in ext.sources if s.endswith(".cu")]:
            obj = Path(self.build_temp) / (Path(source).stem + ".o")
            obj.parent.mkdir(parents=True, exist_ok=True)
            cmd = [nvcc, "-O3", "-std=c++17", "--threads", "0", "-Xcompiler", "-fPIC"]
            cmd += [*gencode_flags(), "-c", source, "-o", str(obj)]
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            objects.append(str(obj))
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        ext.extra_objects = [*objects, *ext.extra_objects]
        ext.include_dirs = [*ext.include_dirs, str(home / "include")]
        ext.library_dirs = [*ext.library_dirs, str(home / "lib64")]
        super().build_extension(ext)


def cuda_extensions() -> list[Extension]:
    """sae_fast._C from csrc/, when asked for and nvcc is on PATH."""
    if MODE not in ("auto", "0", "1"):
        raise SystemExit(f"SAE_FAST_BUILD_CUDA must be auto, 0 or 1, got {MODE!r}")
    if MODE == "0":
        return []
    if shutil.which("nvcc") is None:
        if MODE == "1":
            raise SystemExit("SAE_FAST_BUILD_CUDA=1 but nvcc is not on PATH")
        warnings.warn(
            "sae_fast: nvcc not found; installing without the CUDA extension", stacklevel=1
        )
        return []
    import pybind11

    return [
        Extension(
            "sae_fast._C",
            sources=["csrc/bindings.cpp", "csrc/sparse_backward.cu"],
            include_dirs=[pybind11.get_include(), "csrc"],
            libraries=["cudart_static", "rt", "pthread", "dl"],
            extra_compile_args=["-std=c++17", "-O3"],
            language="c++",
        )
    ]


setup(ext_modules=cuda_extensions(), cmdclass={"build_ext": BuildWithNvcc})
