#!/usr/bin/env bash
# The one command to run on a machine with an NVIDIA GPU (H100, H200, A100) and its own
# PyTorch and Triton: builds and installs afa_ext against that torch (CUDA kernels for
# sm_80 and sm_90), runs the whole test suite (the Triton and CUDA tests run on the GPU),
# then the GPU benchmarks (the losses, and a whole training step: bench/train_step.py), and
# writes a short report.
#
#   bash bench/gpu_check.sh                 # everything; report in bench/out/gpu_check/report.md
#   bash bench/gpu_check.sh --quick         # smaller benchmark budget
#   bash bench/gpu_check.sh --no-tests      # build and benchmarks only (or --no-build, --no-bench:
#                                           # to split the work over calls with a time limit)
#   OUT=/somewhere bash bench/gpu_check.sh  # another report folder
#
# No internet is needed: the build uses the torch, triton, setuptools and ninja
# already installed. Every stage runs even if an earlier one failed; the exit status is
# that of the first failing stage.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/out/gpu_check}
BUDGET=6 BUILD=1 TESTS=1 BENCH=1
for arg in "$@"; do
  case "$arg" in
    --quick) BUDGET=2 ;;
    --no-build) BUILD=0 ;;
    --no-tests) TESTS=0 ;;
    --no-bench) BENCH=0 ;;
    *) echo "unknown option $arg (expected --quick, --no-build, --no-tests, --no-bench)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
status=0
stage() {  # stage NAME LOG COMMAND...: run, keep the log, remember the first failure
  local name=$1 log=$2; shift 2
  echo "== $name" | tee -a "$OUT/stages.txt"
  "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "   exit $rc" | tee -a "$OUT/stages.txt"
  [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
  return 0
}
: > "$OUT/stages.txt"

stage "machine" machine.log bash -c "nvidia-smi -L; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpu\", torch.cuda.get_device_name())'"
# An editable install; where pip cannot write to the environment, an in-place build.
[[ $BUILD == 1 ]] && stage "build" build.log bash -c "$PY -m pip install --no-build-isolation --no-deps --no-index -v -e . \
  || $PY setup.py build_ext --inplace"
stage "backends" backends.log $PY -c "import afa_ext; print(afa_ext.available_backends()); print(afa_ext.build_info())"
[[ $BUILD == 1 ]] && stage "cuda resource usage" cuda_resources.md $PY bench/cuda_resource_usage.py "$OUT/build.log"
# One Triton configuration per kernel variant in the tests (autotuning every small test
# shape would only cost compile time); the benchmarks autotune.
[[ $TESTS == 1 ]] && stage "tests" tests.log env AFA_EXT_TRITON_AUTOTUNE=0 $PY -m pytest tests -q -rs -p no:cacheprovider
[[ $BENCH == 1 ]] && stage "multi-layer benchmark" multilayer.md $PY bench/multilayer.py --device cuda --dtypes float32 bfloat16 \
  --budget $BUDGET --out "$OUT"
[[ $BENCH == 1 ]] && stage "per-shape benchmark" report.log $PY bench/report.py --preset resnet101-b64 --device cuda \
  --dtypes float32 bfloat16 --budget $BUDGET --out "$OUT"
# One whole AFA training step (ResNet-50 and MobileNetV2; ast, act, delta; original,
# original+compile, fused) at batch 64. Its history starts as a copy of the committed one, so
# that $OUT/train_step.csv (with train_step.png and the table in train_step.md) can replace
# bench/data/train_step.csv and its report be regenerated with `bench/train_step.py --report`.
[[ $BENCH == 1 ]] && stage "training step benchmark" train_step.log bash -c "[[ -f '$OUT/train_step.csv' ]] \
  || cp bench/data/train_step.csv '$OUT/train_step.csv'; $PY bench/train_step.py --device cuda --full \
  --budget $((BUDGET * 3)) --history '$OUT/train_step.csv' --plot '$OUT/train_step.png' --results '$OUT/train_step.md'"

# A stage skipped now keeps the log of an earlier call into the same OUT (the report says so).
touch "$OUT/tests.log" "$OUT/cuda_resources.md" "$OUT/multilayer.md" "$OUT/report.log" "$OUT/train_step.md"
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo; echo '```'; cat "$OUT/machine.log" "$OUT/backends.log"; echo '```'
  echo; echo "Stages run by this call (other sections may come from an earlier call):"; echo '```'; cat "$OUT/stages.txt"; echo '```'
  echo; echo "Tests: $(tail -n 1 "$OUT/tests.log")"
  echo; echo "## CUDA kernels: registers and spills"; echo; cat "$OUT/cuda_resources.md"
  echo; echo "## Four-layer losses, fwd+bwd"; echo; cat "$OUT/multilayer.md"
  echo; echo "## Per layer shape"; echo; sed -n '/^|/,$p' "$OUT/report.log"
  echo; echo "## A whole training step"; echo; sed -n '/<!-- train_step:begin -->/,/<!-- train_step:end -->/p' "$OUT/train_step.md"
} > "$OUT/report.md"
echo "report: $OUT/report.md (exit $status)"
exit $status
