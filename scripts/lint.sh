#!/usr/bin/env bash
# Formatting, lints, types, and the stub checked against the built module (run after install.sh).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"
cd "$here/.."
cargo fmt --all --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings
python3 -m ruff check python tests bench stress scripts examples
python3 -m ruff format --check python tests bench stress scripts examples
python3 -m mypy
python3 -m mypy.stubtest llama_sessions._native --allowlist tests/stubtest-allowlist.txt
# The stub's docstrings are the binding's Rust doc comments, copied (their one home).
python3 scripts/stub_docs.py --check
