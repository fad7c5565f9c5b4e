#!/usr/bin/env bash
# Run THERE, on the lent GPU machine, right after device.sh in the same lease (it reuses /tmp/payload): the CPU rows
# on that machine's CPU, a 16-core Xeon with AVX-512 VNNI, BF16 and AMX (issue 15's "results from an AVX-512 VNNI
# CPU"; the development machine and CI are AVX2-only). llama.cpp is built there for that CPU (GGML_NATIVE=ON, no
# CUDA: the carried CUDA build's CPU kernels are portable AVX2) from .devcarry/llama-cpu/*.tar.xz, the pinned
# llama-cpp-python's source without its GPU backends (README.md beside this file says how it is made).
#   naive transformers cpu-fp32 | edge int8+q4_0 (ONNX Runtime CPU + llama.cpp) | peer llama.cpp mtmd+q4_0, the
#   roofline, many faces at once and the live loop (issue 15's done-when); after device.sh (its /tmp/payload) or
#   alone with .devcarry/cpu-payload.tar.xz carried.
# Usage: bash benchmarks/gpu/cpu.sh [extra bench options...]; results and the log go to $OUT/cpu-1b.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out} P=/tmp/payload
dest="$OUT/cpu-1b"
mkdir -p "$dest"
exec > >(tee "$dest/cpu.log") 2>&1
say() { echo "[$(date +%T)] $*"; }
fail() { say "STOP: $*"; exit 3; }
if [ ! -d $P/site ]; then  # not after device.sh: the small CPU payload (prepare.sh) is enough
    [ -f .devcarry/cpu-payload.tar.xz ] || fail "no $P/site and no .devcarry/cpu-payload.tar.xz: carry it (README.md)"
    mkdir -p $P && tar -xJf .devcarry/cpu-payload.tar.xz -C $P
fi
src=$(ls .devcarry/llama-cpu/llama_cpp_python-*.tar.xz 2>/dev/null | head -1) || true
[ -n "$src" ] || fail "no .devcarry/llama-cpu/llama_cpp_python-*.tar.xz: carry it (README.md)"

avx512="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
flags=$([ "${AMX:-0}" = 1 ] && echo "-DGGML_NATIVE=ON" || echo "$avx512")
say "llama-cpp-python for this CPU, CPU backend only: $flags"
grep -o -w -E "avx512f|avx512_vnni|avx512_bf16|amx_bf16|amx_int8" /proc/cpuinfo | sort | uniq -c
rm -rf /tmp/llcpu && mkdir -p /tmp/llcpu/src /tmp/llcpu/site && tar -xJf "$src" -C /tmp/llcpu/src
t0=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="$flags" \
    python3 -m pip wheel -q --no-deps --no-index --no-build-isolation -w /tmp/llcpu/whl /tmp/llcpu/src/*/ \
    || fail "llama-cpp-python did not build for this CPU (above)"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/llcpu/site /tmp/llcpu/whl/*.whl
say "built in $(( $(date +%s) - t0 )) s"
# this build's llama_cpp before the carried CUDA one; ONNX Runtime's CPU provider from the carried package
export PYTHONPATH="/tmp/llcpu/site:$P/site:$PWD"
facellm() { python3 -c "import sys; from facellm_edge.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
python3 -c "import llama_cpp; print(llama_cpp.__file__); print(llama_cpp.llama_print_system_info().decode())"

say "bench: facellm-1b dimensions on the CPU"
t0=$(date +%s)
facellm bench --synthetic facellm-1b --tokenizer $P/tokenizer --image $P/t1.jpg \
    --detector-model facellm_edge/runtime/detect/models/face_detection_yunet_2023mar.onnx \
    --quant q4_0 --vision int8,mmproj --device cpu --naive cpu-fp32 \
    --no-profiles --no-verify --out "$dest/results" "$@"
say "bench took $(( $(date +%s) - t0 )) s"
head -40 "$dest/results/results.md"
