#!/usr/bin/env bash
# Installs what the tests need and runs every test: the Rust core's tests and the Python suite, on the real
# default model.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PIP_EXTRA=".[test]" bash "$here/install.sh"
source "$here/common.sh"
cd "$here/.."
LLAMA_SESSIONS_MODEL="$(python3 -m llama_sessions fetch-model)"
export LLAMA_SESSIONS_MODEL
cargo test --release --locked -p llama-sessions
python3 -m pytest tests "$@"
