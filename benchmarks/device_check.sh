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
# Then every other writer with --device (ComfyUI, diffusers-native, FP8 calibrated, smoothing, a mix) against
# its CPU bytes, and verify on the GPU.  It takes about 5 minutes on an H100 (more with the writers: untimed).  QC_DEVICE=cpu QC_SHAPE=512x3072 runs
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

echo "== the other --device paths: ComfyUI, diffusers-native and FP8 files, smoothing, a mix, verify; CUDA against CPU"
# Each output is written on the CPU and on $device and compared byte for byte.  The encoders are plain
# float32 rounding, so they should agree; the measured choices (smoothing, the mix, calibrated FP8's
# block measure) may tip a near-tie the other way on another device: a difference there is reported, with
# the layer counts the report prints, not failed.
rm -rf /tmp/qc-files && mkdir -p /tmp/qc-files/cpu /tmp/qc-files/dev
python3 -m qconvert make-tiny /tmp/qc-files/m --layers 2 >/dev/null
python3 -m qconvert calibrate /tmp/qc-files/m --synthetic 1 --steps 2 --height 64 --width 64 \
    -o /tmp/qc-files/calib.safetensors --device "$device" >/dev/null
files_same=0; files_differ=0
check() {  # NAME COMMAND...: the command with -o FILE, on the CPU and on $device
    name=$1; shift
    "$@" -o "/tmp/qc-files/cpu/$name" --quiet >/dev/null
    "$@" -o "/tmp/qc-files/dev/$name" --quiet --device "$device" >/dev/null || { echo "FAILED on $device: $name"; status=1; return; }
    if cmp -s "/tmp/qc-files/cpu/$name" "/tmp/qc-files/dev/$name"; then files_same=$((files_same + 1))
    else files_differ=$((files_differ + 1)); echo "differs: $name"; fi
}
for fmt in nvfp4 mxfp8 int8 w4a8 w6a8 awq-w4a16 convrot-w4a4; do
    check "$fmt.safetensors" python3 -m qconvert to-comfy /tmp/qc-files/m --format "$fmt"
done
check smoothed.safetensors python3 -m qconvert to-comfy /tmp/qc-files/m --format nvfp4 --smooth --calib /tmp/qc-files/calib.safetensors
check mix.safetensors python3 -m qconvert to-comfy /tmp/qc-files/m --format mix --target-size 0.006
check fp8r.safetensors python3 -m qconvert to-diffusers /tmp/qc-files/m --format fp8r
check bfl-nvfp4.safetensors python3 -m qconvert to-diffusers /tmp/qc-files/m --format nvfp4 --calib /tmp/qc-files/calib.safetensors
check fp8-calibrated.safetensors python3 -m qconvert to-fp8 /tmp/qc-files/m --activations calibrated --calib /tmp/qc-files/calib.safetensors
echo "other writers on $device: $files_same files identical to the CPU's, $files_differ different"
python3 -m qconvert verify /tmp/qc-files/dev/smoothed.safetensors --reference /tmp/qc-files/m --report /tmp/qc-files/verify \
    --height 64 --width 64 --steps 2 --no-decode --device "$device" | tail -3 || status=1

echo "== speed on CUDA (float32 MB/s; ggml's C reference on $threads CPU threads for scale)"
python3 benchmarks/bench_quants.py --device "$device" --backends torch --threads "$threads" --repeat 3 \
    --types Q4_K,Q6_K --gpu-chunk 22,23,24,25 --shape "$shape"
python3 benchmarks/bench_quants.py --device "$device" --backends torch --threads "$threads" --repeat 3 --shape "$shape"
python3 benchmarks/bench_quants.py --device "$device" --backends torch --threads "$threads" --repeat 2 --shape "$shape" \
    --imatrix --types Q4_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K
exit "${status:-0}"
