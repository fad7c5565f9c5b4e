#!/usr/bin/env bash
# Build llama-cpp-python's wheel with CUDA for Hopper (sm_90) from its source archive, with nvcc and the cuBLAS
# headers and libraries wherever this machine has them: a CUDA toolkit, or the nvidia-* pip packages beside
# torch (the lent GPU machine's image, and this project's .venv, hold cuBLAS only there).
# Usage: llama-cuda.sh PYTHON SDIST.tar.gz OUT_DIR
#   GGML_NATIVE=ON|OFF  CPU kernels for this CPU (default ON: build where it runs) or portable AVX2 (OFF)
#   OFFLINE=1           no registry (the GPU machine): build with the packages already installed
set -euo pipefail
py=$1 sdist=$2 out=$3
native=${GGML_NATIVE:-ON}
nvcc=$(command -v nvcc) || { echo "no nvcc on PATH" >&2; exit 3; }
cuda=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
nv=$("$py" -c "import os, site; print(*[os.path.join(p, 'nvidia') for p in site.getsitepackages() if os.path.isdir(os.path.join(p, 'nvidia'))][:1])")
# One toolkit root for CMake's FindCUDAToolkit: nvcc's folder plus every include and lib folder found
root=$(mktemp -d /tmp/cudaroot.XXXXXX) && trap 'rm -rf "$root"' EXIT
mkdir -p "$root/include" "$root/lib64"
ln -s "$cuda/bin" "$root/bin"; [ ! -d "$cuda/nvvm" ] || ln -s "$cuda/nvvm" "$root/nvvm"
link_all() {  # link_all DEST DIR...: every entry of each DIR into DEST, the first of a name wins
    local dest=$1 d f; shift
    for d in "$@"; do
        [ -d "$d" ] || continue
        for f in "$d"/*; do [ -e "$dest/$(basename "$f")" ] || ln -s "$f" "$dest/"; done
    done
}
link_all "$root/include" "$cuda/include" "$cuda/targets/x86_64-linux/include" \
    $([ -z "$nv" ] || find "$nv" -maxdepth 3 -type d -name include)
link_all "$root/lib64" "$cuda/lib64" "$cuda/targets/x86_64-linux/lib" $([ -z "$nv" ] || find "$nv" -maxdepth 3 -type d -name lib)
for n in cudart cublas cublasLt; do
    [ -e "$root/lib64/lib$n.so" ] || ln -s "$(ls "$root"/lib64/lib$n.so.* | head -1)" "$root/lib64/lib$n.so"
done
# NO_VMM: llama.cpp then needs no libcuda at link time (a build machine without the driver); the GPU machine's
# driver is loaded at run time by the CUDA runtime either way
flags="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NO_VMM=ON -DGGML_NATIVE=$native -DCUDAToolkit_ROOT=$root"
[ "$native" = ON ] || flags="$flags -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
t0=$(date +%s)
CUDACXX="$nvcc" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="$flags" \
    "$py" -m pip wheel -q --no-deps ${OFFLINE:+--no-index --no-build-isolation} -w "$out" "$sdist"
echo "llama-cpp-python built with CUDA (sm_90, GGML_NATIVE=$native) in $(( $(date +%s) - t0 )) s: $(ls "$out"/llama_cpp_python-*.whl)"
