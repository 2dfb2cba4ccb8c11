#!/usr/bin/env bash
# The GPU check, one command, in the repo root of a bare machine with a GPU (no network):
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh          # results in $OUT
#   bash benchmarks/gpu_check.sh --dry                      # the same steps, CPU, tiny shapes
#
# 1. builds sae_fast._C for this card and installs the checkout (editable, no dependencies:
#    the machine's torch, triton, nvcc, pybind11 and setuptools serve);
# 2. installs the wheels in .whl/ if that folder was carried (the benchmark peers);
# 3. unpacks .triton-cache.tgz if carried (a cache returned by an earlier call);
# 4. runs the GPU tests (pytest -m gpu) into $OUT/pytest-gpu.txt;
# 5. runs benchmarks/gpu_check.py: the fused and chunked encoders against an exact top-k at
#    the gpu preset, the m * d > 2^31 probe, both encoders timed against cuBLAS and
#    torch.topk with the pick the dispatcher makes, the fused optimizer pass against the
#    step it replaces, each beside the roofline's prediction, and the benchmark suite with
#    the peers;
# 6. packs Triton's cache into $OUT/triton-cache.tgz for the next call.
# Each step has its own time limit, so that the whole fits 9 minutes on a cold machine.
# --dry skips 1-3 and 6, and runs 4-5 on the CPU with the Triton interpreter: the tests run it.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${OUT:-benchmarks/out/gpu-check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
status=0
step() { printf '%s gpu_check: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ "$DRY" = 0 ]; then
  archs=$($PYTHON -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
  step "building sae_fast._C for sm_$archs and installing the checkout"
  SAE_FAST_BUILD_CUDA=1 SAE_FAST_CUDA_ARCHS="$archs" timeout 120 \
    $PYTHON -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    > "$OUT/install.txt" 2>&1 || { step "install failed (see install.txt)"; exit 1; }
  if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    step "installing the carried wheels"
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      >> "$OUT/install.txt" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [ -f .triton-cache.tgz ]; then
    mkdir -p "$HOME/.triton" && tar xzf .triton-cache.tgz -C "$HOME/.triton"
  fi
else
  export TRITON_INTERPRET=1
fi

step "pytest -m gpu"
timeout 180 $PYTHON -m pytest -q -m gpu -p no:cacheprovider > "$OUT/pytest-gpu.txt" 2>&1
code=$?
tail -n 1 "$OUT/pytest-gpu.txt" >&2
# 5: no tests collected, as on a CPU where every GPU test skips.
if [ "$code" != 0 ] && [ "$code" != 5 ]; then status=1; fi

step "exact top-k, 2^31 offsets, encoders, optimizer, benchmark suite"
args=(--out "$OUT")
[ "$DRY" = 1 ] && args+=(--dry)
timeout 220 $PYTHON -m benchmarks.gpu_check "${args[@]}" || status=1

if [ "$DRY" = 0 ] && [ -d "$HOME/.triton/cache" ]; then
  tar czf "$OUT/triton-cache.tgz" -C "$HOME/.triton" cache
fi
step "done (status $status); results in $OUT"
exit $status
