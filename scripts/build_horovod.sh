#!/usr/bin/env bash
# Build Horovod 0.28.1 (the last release) from its sdist into a venv, CPU/gloo only.
#
#   scripts/build_horovod.sh [PYTHON]      # default: .venv/bin/python  (~2.5 min on 2 idle cores; ~45 min at load 13)
#   HVD_TARGET=/opt/hvd scripts/build_horovod.sh   # install beside the venv instead (pip --target);
#                                                  # then PYTHONPATH=/opt/hvd, horovodrun is /opt/hvd/bin
#
# Once horovod.torch imports, collectives' registry reports the ``horovod`` backend as available
# (so suites that loop over registry.available() will include it).
# Why patch: 0.28.1 compiles with C++14 while torch >= 2.1 headers need C++17, and
# build isolation hides the installed torch, so we build with --no-build-isolation.
set -euo pipefail
PY=${1:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
WORK=$(mktemp -d /tmp/hvdbuild.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
"$PY" -m pip download horovod==0.28.1 --no-deps --no-binary :all: -d . -q
tar xzf horovod-0.28.1.tar.gz
cd horovod-0.28.1
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' CMakeLists.txt horovod/torch/CMakeLists.txt
grep -q 'CMAKE_CXX_STANDARD 17' horovod/torch/CMakeLists.txt
# setuptools/wheel/cmake must already be importable (no build isolation).
"$PY" -m pip install -q wheel
HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo \
MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-cache-dir -v ${HVD_TARGET:+--target "$HVD_TARGET"} . \
    > "$WORK/build.log" 2>&1 || { tail -50 "$WORK/build.log"; exit 1; }
cd /  # check the installed Horovod, not the source tree we are standing in
PYTHONPATH=${HVD_TARGET:-}${HVD_TARGET:+:}${PYTHONPATH:-} "$PY" -c \
    'import horovod.torch as hvd; print("horovod", __import__("horovod").__version__, "gloo built:", __import__("horovod.common.util", fromlist=["x"]).gloo_built())'
