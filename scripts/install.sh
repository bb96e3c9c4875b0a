#!/usr/bin/env bash
# Installs llama-sessions from this checkout into the current Python environment, with llama.cpp built for
# this machine's CPU (see .cargo/config.toml), and puts the default model in the user cache.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"
ensure_build_tools
cd "$here/.."
python3 -m pip install --quiet "${PIP_EXTRA:-.}"
python3 -m llama_sessions fetch-model >/dev/null
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
