#!/bin/sh
# Install qconvert into the current Python; `sh install.sh --test` adds the test oracles
# (pytest, diffusers, accelerate, llama-cpp-python, which compiles ggml: about 6 minutes).
set -e
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # An unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the release qconvert is
    # tested with (its CPU build is what these machines keep on disk).
    "$PY" -m pip install "torch==2.13.0"
fi
case "${1:-}" in
    --test) "$PY" -m pip install -e ".[test]" ;;
    "") "$PY" -m pip install -e . ;;
    *) echo "usage: sh install.sh [--test]" >&2; exit 2 ;;
esac
