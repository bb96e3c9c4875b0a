# Shared by the scripts in this folder: system build dependencies and a cargo target directory that
# survives fresh clones (a cold llama.cpp build takes minutes on two cores).
set -euo pipefail

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-sessions/target}"
mkdir -p "$CARGO_TARGET_DIR"

# llama-cpp-sys-2 needs cmake, a C++17 compiler and libclang (bindgen); the tests need strace (to kill a
# writer at an exact system call), curl (docs/server.md's requests, run against a server) and redis-server
# (the Redis session store's tests start one on loopback).
ensure_build_tools() {
    local missing=()
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    command -v clang >/dev/null 2>&1 || missing+=(clang)
    if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q libclang; then
        missing+=(libclang-dev)
    fi
    command -v strace >/dev/null 2>&1 || missing+=(strace)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    if [ "${#missing[@]}" -eq 0 ]; then
        return
    fi
    echo "installing build tools: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if command -v apt-get >/dev/null 2>&1; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "please install: ${missing[*]} (cmake >= 3.14, a C++17 compiler, libclang, strace, curl, redis-server)" >&2
        exit 1
    fi
}
