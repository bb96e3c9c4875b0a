#!/usr/bin/env bash
# Fuzzes the session envelope readers, llama.cpp's state checker (one KV cache, and the memories of
# sliding-window, hybrid and recurrent models) and a structure-aware session mutator
# (fuzz/, see docs/reliability.md). Not part of test.sh: the corpus it keeps in fuzz/corpus/ and every crash
# it finds (copied to fuzz/regressions/) are replayed by `cargo test` (rust/core/tests/fuzz_corpus.rs).
#
#   bash scripts/fuzz.sh                      # 1,000,000 executions per target
#   FUZZ_RUNS=5000000 bash scripts/fuzz.sh    # more
#   bash scripts/fuzz.sh --minimize           # then rewrite fuzz/corpus/ as a minimized corpus
#   FUZZ_TARGETS=memory_state bash scripts/fuzz.sh   # some targets only
#
# Stable Rust: cargo-fuzz with --sanitizer none builds libFuzzer targets with SanitizerCoverage only (the
# code under test is safe Rust: the findings are panics, overflows, aborts, hangs and excessive memory, each
# reported as a crash). Exits non-zero if any target crashed or hung.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"
cd "$here/.."

runs="${FUZZ_RUNS:-1000000}"
minimize=0
for arg in "$@"; do
    case "$arg" in
        --minimize) minimize=1 ;;
        *) echo "usage: bash scripts/fuzz.sh [--minimize]  (FUZZ_RUNS=executions per target)" >&2; exit 2 ;;
    esac
done
# shellcheck disable=SC2206
targets=(${FUZZ_TARGETS:-session_envelope state_checker structured_session memory_state})

# The fuzz build gets its own target directory: its instrumented dependencies must not replace the main
# build's.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-sessions/fuzz-target}"
work="${FUZZ_WORK_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-sessions/fuzz-work}"

# libFuzzer's runtime is C++, built by libfuzzer-sys.
command -v c++ >/dev/null 2>&1 || ensure_build_tools
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

cargo fuzz build --sanitizer none
cargo run --quiet --release --manifest-path fuzz/Cargo.toml --example make_seeds "$work/seeds"
bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

failed=0
total=0
summary=()
for target in "${targets[@]}"; do
    corpus="$work/corpus/$target"
    artifacts="$work/artifacts/$target"
    mkdir -p "$corpus" "$artifacts" "fuzz/corpus/$target"
    log="$work/$target.log"
    # Seeds: the kept corpus, the regressions, and valid inputs built from scratch. The working corpus
    # persists between runs in $work.
    seeds=("fuzz/corpus/$target" "$work/seeds/$target")
    [ -d "fuzz/regressions/$target" ] && seeds+=("fuzz/regressions/$target")
    # Real states llama.cpp wrote for the tiny models (rust/core/tests/fuzz_corpus.rs writes them).
    [ -d "fuzz/real_states/$target" ] && seeds+=("fuzz/real_states/$target")
    start=$(date +%s)
    set +e
    # -timeout: an input that runs 10 s is a hang; -rss_limit_mb: memory sized by what a file announces
    # would exceed it (an allocation that fails aborts, which is a crash).
    # Real memory states of the tiny models (a recurrent state alone is 20 kB) need longer inputs.
    max_len=4096
    [ "$target" = memory_state ] && max_len=32768
    "$bin/$target" "$corpus" "${seeds[@]}" -runs="$runs" -max_len="$max_len" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$artifacts/" \
        >"$log" 2>&1
    status=$?
    set -e
    seconds=$(($(date +%s) - start))
    executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    executions="${executions:-0}"
    crashes=$(find "$artifacts" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    hangs=$(find "$artifacts" -type f -name 'timeout-*' | wc -l)
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ] || [ "$hangs" -ne 0 ]; then
        failed=1
        echo "$target: libFuzzer exited $status; see $log" >&2
        tail -n 30 "$log" >&2
        # Every finding becomes a regression test.
        mkdir -p "fuzz/regressions/$target"
        find "$artifacts" -type f -exec cp {} "fuzz/regressions/$target/" \;
    fi
    total=$((total + executions))
    summary+=("$(printf '%-20s executions %10s  crashes %s  hangs %s  corpus %s  %ss' "$target" "$executions" \
        "$crashes" "$hangs" "$(find "$corpus" -type f | wc -l)" "$seconds")")
done

if [ "$minimize" -eq 1 ] && [ "$failed" -eq 0 ]; then
    for target in "${targets[@]}"; do
        # libFuzzer records the coverage features of every input in a merge control file; the kept corpus is
        # the seeds (valid inputs, so that the replay reaches the accepting paths), then inputs chosen
        # greedily, the one adding the most features not yet covered first (the smaller on a tie), up to a
        # budget per target that keeps the repository's corpus small.
        case "$target" in
            session_envelope) keep=80 ;;
            state_checker | memory_state) keep=50 ;;
            *) keep=70 ;;
        esac
        control="$work/$target.merge-control"
        rm -rf "$control" "$work/merged/$target"
        mkdir -p "$work/merged/$target"
        max_len=4096
        [ "$target" = memory_state ] && max_len=32768
        "$bin/$target" -merge=1 -merge_control_file="$control" -max_len="$max_len" "$work/merged/$target" \
            "$work/seeds/$target" "$work/corpus/$target" "fuzz/corpus/$target" >"$work/$target.merge.log" 2>&1
        python3 - "$control" "$keep" "fuzz/corpus/$target" "$work/seeds/$target" <<'PY'
import os, shutil, sys

control, keep, out, seeds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lines = open(control).read().splitlines()
n = int(lines[0])
paths = lines[2 : 2 + n]
features: dict[int, set[int]] = {}
for line in lines[2 + n :]:
    if line.startswith("FT "):
        index, *found = line.split()[1:]
        features[int(index)] = set(map(int, found))
size = {i: os.path.getsize(paths[i]) for i in features}
chosen = [i for i in features if os.path.dirname(paths[i]) == seeds]
covered = set().union(*(features.pop(i) for i in chosen))
while len(chosen) < keep:
    best = max(features, key=lambda i: (len(features[i] - covered), -size[i]), default=None)
    if best is None or not features[best] - covered:
        break
    chosen.append(best)
    covered |= features.pop(best)
data = {i: open(paths[i], "rb").read() for i in chosen}
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
for i in chosen:
    name = os.path.basename(paths[i])
    with open(os.path.join(out, name), "wb") as f:
        f.write(data[i])
print(f"{out}: kept {len(chosen)} inputs covering {len(covered)} features")
PY
    done
fi

printf '%s\n' "${summary[@]}"
echo "total executions $total"
if [ "$failed" -ne 0 ]; then
    echo "findings copied to fuzz/regressions/: fix them, keep the files (cargo test replays them)" >&2
    exit 1
fi
