#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: system packages, .venv, lint, then pytest.
#   ./scripts/test.sh                 everything (real ranks, namespace hosts, a SLURM cluster, the wheel)
#   ./scripts/test.sh -m unit         the fast single-process layer (under a minute)
#   ./scripts/test.sh tests/test_slurm_submit.py -k quoted    any pytest arguments
# Needs root for apt and for network namespaces (the multi-host and SLURM tests).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in openssh-server openssh-client iproute2 slurm-wlm munge; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${need[@]}" >/dev/null
fi
./scripts/setup.sh
# Lint and format first: a style error fails CI before the (slow) multi-rank tests run.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
