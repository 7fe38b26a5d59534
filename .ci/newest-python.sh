#!/usr/bin/env bash
# A second, short test run on the newest Python installed here, with the newest jax and tensorflow that the
# project's declared ranges allow there. torch is left out: its Python 3.13 wheel on PyPI is the multi-GB CUDA
# build (the CPU build is not on PyPI), so the torch tests run only in the main run.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # a Python 3.13 (else 3.12) that really runs; pyenv's shims do not unless it is selected
    local minor candidate
    for minor in 3.13 3.12; do
        if command -v "python$minor" >/dev/null 2>&1 && "python$minor" -c "import sys" >/dev/null 2>&1; then
            echo "python$minor"; return
        fi
        if command -v pyenv >/dev/null 2>&1; then
            for candidate in "$(pyenv root)"/versions/"$minor"*/bin/"python$minor"; do
                if [ -x "$candidate" ]; then echo "$candidate"; return; fi
            done
        fi
    done
}

PY="$(find_python)"
if [ -z "$PY" ]; then
    echo "newest-python: no runnable python3.13 or python3.12 on this machine; the second run needs one (skipped)"
    exit 0
fi
VENV="${LAMINA_NEWEST_VENV:-.venv-newest}"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[jax,tensorflow,plot]" "pytest>=8,<10" "hypothesis>=6,<7" \
    "safetensors>=0.4.3,<1"
"$VENV/bin/python" -c "import sys, jax, tensorflow as tf, numpy; print('newest-python:', sys.version.split()[0], 'jax', jax.__version__, 'tensorflow', tf.__version__, 'numpy', numpy.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts="-ra" \
    tests/test_core.py tests/test_layer_library.py tests/test_ops.py tests/test_ops_numpy.py tests/test_tensorflow.py \
    tests/test_train.py tests/test_checkpoint.py
