#!/usr/bin/env bash
# Measure what a runtime install of facellm-edge weighs: a fresh venv, `pip install <clean copy>[EXTRAS]`, then the
# size of site-packages and its largest distributions. Takes minutes (llama-cpp-python compiles the first time; pip's
# cache keeps the wheel), so it is a script, not a test.
#
#   bash scripts/install_size.sh [REF] [EXTRAS]
#     REF     a git ref to measure (default HEAD; "worktree" = the tracked files as they are now, uncommitted edits too)
#     EXTRAS  e.g. "cpu" or "headless" (default: none, `pip install .`)
#   bash scripts/install_size.sh --resolve [EXTRAS...]
#     what each extra resolves to (pip install --dry-run --report, nothing installed): its ONNX Runtime and OpenCV
#     distributions, which must be exactly one of each (default: "" cpu gpu headless gpu-headless insightface dev)
#
# Prints one line `site-packages MB <n>` and the 15 largest entries of site-packages (MB).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
quiet() { grep -v "^WARNING: Location" || true; }  # local index mirrors that lack a package

if [ "${1:-}" = "--resolve" ]; then
    shift
    [ $# -eq 0 ] && set -- "" cpu gpu headless gpu-headless insightface "cpu,insightface" dev
    report="$(mktemp /tmp/facellm-resolve.XXXXXX.json)"
    trap 'rm -f "$report"' EXIT
    for extras in "$@"; do
        spec="$repo"
        [ -n "$extras" ] && spec="$repo[$extras]"
        python3 -m pip install -q --dry-run --ignore-installed --report "$report" "$spec" 2>&1 | quiet
        python3 - "$report" "$extras" <<'PY'
import json, sys
names = sorted(i["metadata"]["name"].lower() for i in json.load(open(sys.argv[1]))["install"])
ort = [n for n in names if n.startswith("onnxruntime")]
cv = [n for n in names if n.startswith("opencv")]
clash = "  CLASH" if len(ort) > 1 or len(cv) > 1 else ""
print(f"[{sys.argv[2]}]".ljust(16), "onnxruntime:", ",".join(ort) or "-", " opencv:", ",".join(cv) or "-", clash)
PY
    done
    exit 0
fi
ref="${1:-HEAD}"
extras="${2:-}"
work="$(mktemp -d /tmp/facellm-size.XXXXXX)"
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/src"
if [ "$ref" = "worktree" ]; then
    git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 tar cf - --ignore-failed-read) | tar xf - -C "$work/src"
else
    git -C "$repo" archive "$ref" | tar xf - -C "$work/src"
fi
# the shipped YuNet model may be ignored by git: take it from the checkout when the copy lacks it
yunet="facellm_edge/runtime/detect/models/face_detection_yunet_2023mar.onnx"
if [ ! -f "$work/src/$yunet" ] && [ -f "$repo/$yunet" ]; then cp "$repo/$yunet" "$work/src/$yunet"; fi

python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet
spec="$work/src"
[ -n "$extras" ] && spec="$work/src[$extras]"
"$work/venv/bin/python" -m pip install -q "$spec" 2>&1 | quiet

site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "ref $ref extras '${extras}'"
echo "site-packages MB $(du -sm "$site" | cut -f1)"
du -sm "$site"/* | sort -rn | head -15
"$work/venv/bin/python" -m pip list --format=freeze 2>/dev/null | tr '\n' ' '
echo
