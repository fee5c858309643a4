#!/bin/sh
# The GPU checks of the GGUF encoders, as one short run on a CUDA machine.
#
# The torch encoders are written to be byte-exact on any device (one IEEE
# float32 operation per call, no fused multiply-add, sums in ggml's order), but
# CI has no GPU, so this is where that claim and their speed get measured.
#
#   sh benchmarks/device_check.sh --prepare   # here, with PyPI: fills .device/
#   sh benchmarks/device_check.sh             # on the GPU machine, .device/ carried
#
# --prepare gathers what a bare GPU image (torch, numba, pytest, no PyPI) lacks:
# the gguf wheel, and ggml's libggml-base.so from the installed llama-cpp-python
# (with its libgomp) so the oracle tests compare the CUDA bytes with ggml's own.
# The run prints: the CUDA oracle tests (every type, with and without an
# imatrix, edge cases), a whole to-gguf --level all on CUDA compared byte for
# byte with the CPU, and bench_quants' MB/s on CUDA per type and GPU chunk size.
# It takes about 5 minutes on an H100.  QC_DEVICE=cpu QC_SHAPE=512x3072 runs
# the same steps here, to check the script itself.
set -eu
cd "$(dirname "$0")/.."
DEV=.device

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$DEV/whl"
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
        -d "$DEV/whl" "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    lib=$(python3 -c 'import sys; sys.path.insert(0, "tests"); import ggml_oracle; print(ggml_oracle.find_library() or "")')
    [ -n "$lib" ] || { echo "error: llama-cpp-python is not installed here; sh install.sh --test first" >&2; exit 1; }
    cp -L "$lib" "$DEV/libggml-base.so"
    gomp=$(ldd "$lib" | awk '/libgomp/ {print $3}')
    [ -z "$gomp" ] || cp -L "$gomp" "$DEV/"
    du -sh "$DEV"
    echo "now: run 'sh benchmarks/device_check.sh' on the GPU machine with carry [\"$DEV\"]"
    exit 0
fi

[ -d "$DEV/whl" ] || { echo "error: $DEV/whl is missing: run 'sh benchmarks/device_check.sh --prepare' first" >&2; exit 1; }
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qc-site "$DEV"/whl/*.whl
export PYTHONPATH="/tmp/qc-site:$PWD" QCONVERT_LIBGGML="$PWD/$DEV/libggml-base.so"
export LD_LIBRARY_PATH="$PWD/$DEV:${LD_LIBRARY_PATH:-}" NUMBA_CACHE_DIR=/tmp/qc-numba
device=${QC_DEVICE:-cuda} shape=${QC_SHAPE:-12288x3072} threads=$(nproc)
nvidia-smi -L 2>/dev/null || true
python3 -c 'import sys, torch, numba; print("torch", torch.__version__, torch.cuda.get_device_name() if sys.argv[1] == "cuda" else "cpu", "| numba", numba.__version__)' "$device"

echo "== CUDA bytes against ggml and the CPU"
python3 -m pytest -q -p no:cacheprovider -rs tests/formats -k cuda || status=$?

echo "== a whole to-gguf --level all, CUDA against CPU"
rm -rf /tmp/qc-tiny /tmp/qc-cpu /tmp/qc-cuda
python3 -m qconvert make-tiny /tmp/qc-tiny --layers 2 >/dev/null
python3 -m qconvert to-gguf /tmp/qc-tiny --level all -o /tmp/qc-cpu --quiet
python3 -m qconvert to-gguf /tmp/qc-tiny --level all -o /tmp/qc-cuda --device "$device" --quiet
same=0; differ=0
for f in /tmp/qc-cpu/*.gguf; do
    if cmp -s "$f" "/tmp/qc-cuda/$(basename "$f")"; then same=$((same + 1)); else differ=$((differ + 1)); echo "differs: $(basename "$f")"; fi
done
echo "to-gguf on $device: $same files identical to the CPU's, $differ different"

echo "== speed on CUDA (float32 MB/s; ggml's C reference on $threads CPU threads for scale)"
python3 benchmarks/bench_quants.py --device "$device" --backends torch --threads "$threads" --repeat 3 \
    --types Q4_K,Q6_K --gpu-chunk 22,23,24,25 --shape "$shape"
python3 benchmarks/bench_quants.py --device "$device" --backends torch --threads "$threads" --repeat 3 --shape "$shape"
python3 benchmarks/bench_quants.py --device "$device" --backends torch --threads "$threads" --repeat 2 --shape "$shape" \
    --imatrix --types Q4_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K
exit "${status:-0}"
