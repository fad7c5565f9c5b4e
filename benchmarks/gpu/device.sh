#!/usr/bin/env bash
# Run THERE, on the lent GPU machine, from the repository root, in the device call that carries the last piece of
# .devcarry/ (made here by prepare.sh; README.md beside this file gives the calls). It unpacks what the machine's
# image lacks into /tmp/payload, builds llama-cpp-python with CUDA for this GPU unless it came built, checks
# with `facellm-edge doctor --device cuda` that ONNX Runtime's CUDA provider initialises and computes, and that
# llama.cpp offloads, then runs the bench:
#   naive transformers cuda-bf16 | edge cuda fp32+q4_0 (ORT CUDA + all layers on the GPU) | peer cuda (libmtmd)
#   [+ edge tensorrt fp32+q4_0 where libnvinfer is present], FaceLLM-1B dimensions, many faces on t1.jpg.
# Usage: bash benchmarks/gpu/device.sh [1b|8b] [extra bench options...]; results and the log go to $OUT/gpu-<size>.
set -euo pipefail
cd "$(dirname "$0")/../.."
size=${1:-1b}; shift || true
C=.devcarry OUT=${OUT:-/tmp/out}
dest="$OUT/gpu-$size"
mkdir -p "$dest"
exec > >(tee "$dest/device.log") 2>&1
say() { echo "[$(date +%T)] $*"; }
fail() { say "STOP: $*"; exit 3; }

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || say "no nvidia-smi"
nproc; grep -m1 "model name" /proc/cpuinfo; grep -o -w -E "avx512_vnni|avx512_bf16|amx_bf16|avx2" /proc/cpuinfo | sort | uniq -c
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
    || say "no torch in this python3: no naive baseline and no export possible"

say "the carried pieces: one archive (prepare.sh)"
ls $C/part-* >/dev/null 2>&1 || fail "no .devcarry/part-* here: carry them (README.md)"
cat $C/part-* > /tmp/payload.tar.xz
echo "$(cat $C/SHA256)  /tmp/payload.tar.xz" | sha256sum -c --quiet \
    || fail "the pieces do not add up (have: $(ls $C | tr '\n' ' ')): carry every part-NN and SHA256"
P=/tmp/payload && rm -rf $P && mkdir -p $P && tar -xJf /tmp/payload.tar.xz -C $P && rm /tmp/payload.tar.xz
SITE=$P/site
export PYTHONPATH="$SITE:$PWD"  # the carried packages and this checkout before the image's own
# The CUDA 13 libraries (cuBLAS, cuDNN, cudart, ...) of the image's pip packages, for ORT's and llama.cpp's libraries
nv=$(python3 -c "import os, site; print(*[os.path.join(p, 'nvidia') for p in site.getsitepackages() if os.path.isdir(os.path.join(p, 'nvidia'))][:1])")
[ -n "$nv" ] || say "no pip nvidia-* packages beside this python3: the CUDA libraries must be on the loader's path"
[ -z "$nv" ] || export LD_LIBRARY_PATH="$(find "$nv" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"

say "llama-cpp-python with CUDA"
if [ ! -d "$SITE/llama_cpp" ]; then
    OFFLINE=1 bash benchmarks/gpu/llama-cuda.sh python3 "$(ls $P/llama/*.tar.gz)" $P/llama \
        || fail "llama-cpp-python did not build with CUDA (the pip log above says why)"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $P/llama/*.whl
fi

say "the GPU paths work before anything is measured (the product's own doctor, then llama.cpp's offload)"
facellm() { python3 -c "import sys; from facellm_edge.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
facellm doctor --device cuda || fail "ONNX Runtime's CUDA provider does not start (doctor, above)"
python3 -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" \
    || fail "llama.cpp does not offload to the GPU (doctor's llama.cpp line above)"
devices=cuda
if python3 -c "import ctypes; ctypes.CDLL('libnvinfer.so.10')" 2>/dev/null; then devices=cuda,tensorrt
else say "no libnvinfer.so.10 here: no TensorRT rows (TensorRT's wheels are over the carry limit)"; fi

bench() {  # bench NAIVE [extra options]: one whole run, facellm-$size dimensions, into $dest/results
    local naive=$1; shift
    facellm bench --synthetic "facellm-$size" --tokenizer $P/tokenizer --image $P/t1.jpg \
        --detector-model facellm_edge/runtime/detect/models/face_detection_yunet_2023mar.onnx \
        --quant q4_0 --vision fp32,mmproj --device "$devices" --naive "$naive" \
        --no-profiles --no-live --no-roofline --no-verify --out "$dest/results" "$@"
}
say "bench: facellm-$size dimensions on $devices, naive cuda-bf16, with this image's transformers"
python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
t0=$(date +%s)
if ! bench cuda-bf16 "$@"; then
    # One lease is all there is: rather than nothing, the edge path alone, with the transformers release the
    # project's CI runs (carried as .whl/transformers-*.whl where the call carries .whl), so that a failure of the
    # naive baseline or of this image's transformers does not cost the GPU rows too. The log above says which failed.
    say "the whole run failed after $(( $(date +%s) - t0 )) s; again without the naive baseline"
    if ls .whl/transformers-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tf .whl/transformers-*.whl
        export PYTHONPATH="$SITE:/tmp/tf:$PWD"
    fi
    python3 -c "import transformers; print('transformers', transformers.__version__)"
    bench none --force "$@" || fail "the edge path failed on $devices too (above)"
fi
say "bench took $(( $(date +%s) - t0 )) s"
head -60 "$dest/results/results.md"
