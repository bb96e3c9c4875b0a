"""Run every benchmark, then regenerate docs/benchmarks.md and docs/benchmarks.png from bench/results/*.json.

Run: python bench/run_all.py                 # everything (about 45 minutes on 2 cores), then the report
     python bench/run_all.py --only io_limit memory
     python bench/run_all.py --report-only   # only regenerate the report from the JSON files

Before each benchmark the driver waits until the machine is idle (other work on a 2-core machine makes
llama.cpp's threads wait for each other); the CPU time other processes took during each benchmark is recorded
in its JSON (environment.machine.other_processes_during_run).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, RESULTS_DIR, ROOT, wait_for_quiet

MODULES = (
    "session_sizes",
    "restore_vs_prefill",
    "io_limit",
    "memory",
    "vs_llama_cpp_python",
    "threads",
    "manager_sessions",
    "breakdown",
    "signed_load",
    "prefix_cache_ttft",
    "chunk_length",
    "chunked_sessions",
    "chunk_agreement",
    "batching",
    "batch_ceiling",
    "batching_agreement",
    "server",
    "stores",
)
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks.png"
FINDINGS = BENCH_DIR / "findings.md"


def run(modules: list[str]) -> None:
    durations: dict[str, float] = {}
    waits: dict[str, float] = {}
    start = time.perf_counter()
    for name in modules:
        t0 = time.perf_counter()
        wait_for_quiet()
        waits[name] = time.perf_counter() - t0
        print(f"== {name}", flush=True)
        t1 = time.perf_counter()
        subprocess.run([sys.executable, str(BENCH_DIR / f"{name}.py")], check=True)
        durations[name] = time.perf_counter() - t1
        print(f"== {name}: {durations[name]:.0f} s", flush=True)
    total = time.perf_counter() - start
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    log_path = RESULTS_DIR / "run_all.json"
    log: dict[str, Any] = json.loads(log_path.read_text()) if log_path.exists() else {}
    log["module_seconds"] = {**log.get("module_seconds", {}), **durations}
    if set(modules) == set(MODULES):
        log["full_run"] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": total,
            "seconds_waiting_for_idle_between_scripts": sum(waits.values()),
        }
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    print(f"total {total:.0f} s ({sum(waits.values()):.0f} s waiting for an idle machine)")


# ---------------------------------------------------------------------------------------------------- report


def load_results() -> dict[str, Any]:
    out = {}
    for path in sorted(RESULTS_DIR.glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def busy_note(r: dict[str, Any]) -> str:
    m = r["environment"]["machine"]
    other = m.get("other_processes_during_run", {})
    cores = other.get("other_processes_cores")
    note = f"run {r['environment']['date']}"
    if cores is not None:
        note += (
            f", {other['wall_seconds']:.0f} s; other processes used {cores:.2f} cores on average meanwhile"
        )
    return f"_({note}.)_"


def render_targets(results: dict[str, Any]) -> list[str]:
    rows = []
    for name in MODULES:
        r = results.get(name)
        if not r:
            continue
        for t in r.get("targets", []):
            rows.append([t["name"], t["measured"], t["target"], verdict(t["pass"]), f"`{t['command']}`"])
    return table(["measurement", "measured", "target", "result", "command"], rows, "lllll")


def render_restore(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    out = [
        "## 1. Restore vs re-prefill: time to the first new token",
        "",
        f"A system prompt of N tokens, then the same question ({c['question_tokens']} tokens) and one greedy "
        f"token, in a fresh Context (n_ctx {c['n_ctx']}, f16, n_threads {c['n_threads']}): (a) prefill the "
        "prompt, (b) `load_session` from a file (in the page cache; *cold*: evicted from it first with "
        "`posix_fadvise(DONTNEED)`), (c) `restore` snapshot bytes. Context creation is outside the timer "
        f"(median {ms(r['context_creation']['median'])} ms, reported apart). Median of {c['runs']} runs "
        f"({c['prefill_runs']} for prefill) after a warm-up; the three are interleaved. "
        f"Same answer token in every run: {all(s['same_answer_everywhere'] for s in r['sizes'])}.",
        "",
    ]
    rows = []
    for s in r["sizes"]:
        rows.append(
            [
                str(s["tokens"]),
                mb(s["session_bytes"]),
                ms(s["prefill"]["total"]["median"]),
                ms(s["load"]["total"]["median"]),
                ms(s["load_cold"]["total"]["median"]),
                ms(s["restore"]["total"]["median"]),
                f"{s['speedup_load']:.0f}x",
                f"{s['speedup_restore']:.0f}x",
            ]
        )
    out += table(
        [
            "tokens",
            "session MB",
            "prefill ms",
            "load_session ms",
            "load (cold) ms",
            "restore ms",
            "prefill / load",
            "prefill / restore",
        ],
        rows,
    )
    out += [
        "The target's view: the time until the first new token right after the system prompt is "
        "generated (no question): prefill + 1 token, vs `load_session` or `restore` + 1 token (a restored "
        "context decodes the prompt's last token once more, for its logits). Same token in every run: "
        f"{all(s.get('first_token_same_everywhere', False) for s in r['sizes'])}.",
        "",
    ]
    out += table(
        [
            "tokens",
            "prefill + 1 token ms",
            "load_session + 1 token ms",
            "restore + 1 token ms",
            "prefill / load",
            "prefill / restore",
        ],
        [
            [
                str(s["tokens"]),
                ms(s["first_token"]["prefill"]["median"]),
                ms(s["first_token"]["load"]["median"]),
                ms(s["first_token"]["restore"]["median"]),
                f"{s['first_token_speedup_load']:.0f}x",
                f"{s['first_token_speedup_restore']:.0f}x",
            ]
            for s in r["sizes"]
            if "first_token" in s
        ],
    )
    out += [
        "With a question after the prompt, the question's own decode (about 50 ms for 8 tokens at 2000 "
        "tokens of context, llama.cpp compute that every path pays) bounds the ratio; the phases of each "
        "total (medians, ms): getting the state in, then the question + 1 token.",
        "",
    ]
    rows = []
    for s in r["sizes"]:
        row = [str(s["tokens"])]
        for k in ("prefill", "load", "load_cold", "restore"):
            row.append(f"{ms(s[k]['state']['median'])} + {ms(s[k]['question_and_token']['median'])}")
        rows.append(row)
    out += table(["tokens", "prefill", "load_session", "load (cold)", "restore"], rows)
    return [*out, busy_note(r), ""]


def render_io(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    load, save = r["load"], r["save"]
    out = [
        "## 2. Against the limit: load_session and save_session vs plain I/O of the same bytes",
        "",
        f"{c['tokens']} tokens, f16, n_ctx {c['n_ctx']}: a {mb(r['session_bytes'])} MB session on "
        f"{c['file_system'].get('type', '?')} ({c['file_system'].get('device', '?')}). Median of {c['runs']} "
        "runs after a warm-up, ours and the limit alternating. Load limit: `readinto` a preallocated buffer "
        "from the page cache + one `numpy.copyto` into a second preallocated buffer. Save limit: write the "
        "bytes to a new file, fsync, rename over the previous one, fsync the directory.",
        "",
    ]
    out += table(
        ["operation", "ours ms", "limit ms", "ours / limit"],
        [
            [
                "load",
                ms(load["load_session"]["median"]),
                ms(load["limit_read_copy"]["median"]),
                f"{r['load_ratio']:.2f}x",
            ],
            [
                "save",
                ms(save["save_session"]["median"]),
                ms(save["limit_write_fsync_rename"]["median"]),
                f"{r['save_ratio']:.2f}x",
            ],
        ],
    )
    names = {
        "read_into_preallocated": "read the file into a preallocated, touched buffer (`readinto`)",
        "copy_once": "copy the bytes once (`numpy.copyto`, preallocated)",
        "read_bytes_new_buffer": "read the file into new bytes (`Path.read_bytes`, as `std::fs::read` does)",
        "inspect_session_bytes": "`inspect_session(bytes)`: checksum + header, no model",
        "restore_bytes": "`restore(bytes)`: all checks + llama.cpp's state load + bookkeeping",
        "reset_clears_kv": "`reset()`: empty the KV cache (before 9aec54f a memset of the whole KV buffer; "
        "`restore` does it first)",
        "snapshot": "`snapshot()`: llama.cpp's state copy into new bytes + checksum",
    }
    faults = r.get("minor_page_faults", {})
    rows = []
    for key, desc in {
        **names,
        "load_session": "`load_session` (whole)",
        "save_session": "`save_session`",
    }.items():
        part = load.get(key) or save.get(key)
        if part:
            rows.append([desc, ms(part["median"]), f"{faults[key]:,}" if key in faults else ""])
    page_kib = r.get("page_bytes", 4096) // 1024
    out += [
        f"What the parts cost (medians), and the memory pages ({page_kib} KiB) each touches first:",
        "",
    ]
    out += table(["part", "ms", "minor page faults"], rows)
    return [*out, busy_note(r), ""]


def render_vs(r: dict[str, Any]) -> list[str]:
    ours, their, c = r["ours"], r["llama_cpp_python"], r["config"]
    from statistics import median

    def row(name: str, a: str, b: str, ratio: str) -> list[str]:
        return [name, a, b, ratio]

    o_mem, t_mem = ours["memory"], their["memory"]
    out = [
        "## 3. Against llama-cpp-python",
        "",
        f"llama-cpp-python {their['llama_cpp_python']} (built from source in a separate virtual environment, "
        f"GGML_NATIVE=ON, no AMX; its llama.cpp reports `{their.get('system_info', '')}`), same model, "
        f"n_threads {c['n_threads']}, n_ctx {c['n_ctx']}, n_batch = n_ubatch {c['n_batch']}, f16 KV, no "
        "flash "
        f"attention, the same token ids. Median of {c['runs']} runs after a warm-up; memory: fresh process "
        "per "
        "run (section 5's method). Save: ours is atomic and durable (fsync + rename + directory fsync); "
        "theirs is `save_state()` + `pickle.dump` to a file + fsync. Load: ours `load_session`; theirs "
        f"`pickle.load` from the file + `load_state()`. Greedy generations agree on "
        f"{r['same_generated_tokens']} of {c['generation_tokens']} tokens.",
        "",
    ]
    rows = [
        row(
            f"prefill, {c['prefill_tokens']} tokens (tok/s)",
            f"{median(ours['prefill_tokens_per_second']):.1f}",
            f"{median(their['prefill_tokens_per_second']):.1f}",
            f"{r['ratios']['prefill']:.3f}",
        ),
        row(
            f"generation, greedy {c['generation_tokens']} tokens (tok/s)",
            f"{median(ours['generation_tokens_per_second']):.1f}",
            f"{median(their['generation_tokens_per_second']):.1f}",
            f"{r['ratios']['generation']:.3f}",
        ),
        row(
            "save (ms)",
            ms(ours["saveload"]["save_total"]["median"]),
            ms(their["saveload"]["save_total"]["median"]),
            f"{r['ratios']['save_speedup']:.1f}x faster",
        ),
        row(
            "load (ms)",
            ms(ours["saveload"]["load_total"]["median"]),
            ms(their["saveload"]["load_total"]["median"]),
            f"{r['ratios']['load_speedup']:.1f}x faster",
        ),
        row(
            "file size (MB)",
            mb(ours["saveload"]["file_bytes"]),
            mb(their["saveload"]["file_bytes"]),
            f"{r['ratios']['file_size']:.2f}x smaller",
        ),
        row(
            "peak memory while saving, above baseline (MB)",
            mb(o_mem["save"]["peak_above_baseline_median"]),
            mb(t_mem["save"]["peak_above_baseline_median"]),
            f"{r['ratios']['save_memory']:.2f}x less",
        ),
        row(
            "peak memory while loading, above baseline (MB)",
            mb(o_mem["load"]["peak_above_baseline_median"]),
            mb(t_mem["load"]["peak_above_baseline_median"]),
            f"{r['ratios']['load_memory']:.2f}x less",
        ),
    ]
    out += table(["", "llama_sessions", "llama-cpp-python", "ours vs theirs"], rows)
    sl = their["saveload"]
    out += [
        f"llama-cpp-python's file: the pickled `LlamaState` holds llama.cpp's whole-context state "
        f"({mb(sl['llama_state_bytes'])} MB), a copy of its `scores` array "
        f"({mb(sl['scores_bytes'])} MB: n_batch x n_vocab float32) and the input ids "
        f"({mb(sl['input_ids_bytes'])} MB). Its phases (medians): `save_state()` "
        f"{ms(sl['save_state']['median'])} "
        f"ms, pickle + write + fsync {ms(sl['pickle_write_fsync']['median'])} ms; read + unpickle "
        f"{ms(sl['read_unpickle']['median'])} ms, `load_state()` {ms(sl['load_state']['median'])} ms.",
        "",
    ]
    return [*out, busy_note(r), ""]


def render_sizes(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    out = [
        "## 4. Session file size per KV type",
        "",
        f"Raw KV bytes = tokens x {c['n_layer']} layers x (K row + V row); rows of {c['kv_row_values']} "
        "values: "
        + ", ".join(f"{k} {v} B" for k, v in c["row_bytes"].items())
        + ". q8_0 and q4_0 need flash attention. Sizes are exact (one measurement each); n_ctx does not "
        "change them.",
        "",
    ]
    rows = [
        [
            r_["kv_type"] + (" (flash_attn)" if r_["flash_attn"] else ""),
            str(r_["tokens"]),
            f"{r_['session_bytes']:,}",
            f"{r_['raw_kv_bytes']:,}",
            f"{r_['overhead'] * 100:.2f}%",
        ]
        for r_ in r["rows"]
    ]
    out += table(["KV type", "tokens", "session file (bytes)", "raw KV bytes", "overhead"], rows, "lrrrr")
    return [*out, busy_note(r), ""]


def render_memory(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    out = [
        "## 5. Peak memory while saving and loading",
        "",
        f"{c['tokens']} tokens, f16, n_ctx {c['n_ctx']}. Each run is a fresh process: model, Context (and, "
        "for "
        "a save, the prefill); then the RSS high-water mark is reset (`/proc/self/clear_refs`), VmRSS read "
        "(the baseline: model + context + state), the one operation run and VmHWM read. Median of "
        f"{c['runs']} "
        "runs (they agree to a few pages).",
        "",
    ]
    rows = []
    for op in ("save", "load"):
        m = r[op]
        rows.append(
            [
                f"{op}_session",
                mb(m["baseline_rss_median"]),
                mb(m["peak_above_baseline_median"]),
                mb(m["session_bytes"]),
                f"{m['ratio_to_session_median']:.2f}x",
            ]
        )
    out += table(["operation", "baseline RSS MB", "peak above baseline MB", "session MB", "ratio"], rows)
    return [*out, busy_note(r), ""]


def render_threads(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    out = [
        "## 6. Threads: one Context vs two Contexts generating in parallel",
        "",
        f"Greedy, {c['generated_tokens']} tokens after a short prompt, n_ctx {c['n_ctx']}, 2 cores. "
        "Per-context "
        "rate from GenerationStats (sample + decode per token); aggregate = all generated tokens / "
        "wall-clock "
        f"of the whole call(s), the short prompt included. Median of {c['runs']} runs after a warm-up. "
        '"In a thread after the main thread": the main thread generates before each run, then a worker '
        "thread does (every decode runs on the library's compute threads, so that costs nothing; see "
        "docs/engine.md).",
        "",
    ]
    rows = [
        [
            name,
            f"{v['aggregate_tokens_per_second']:.1f}",
            f"{v['per_context_tokens_per_second']:.1f}",
        ]
        for name, v in r["configs"].items()
    ]
    out += table(["configuration", "aggregate tok/s", "per-context tok/s"], rows, "lrr")
    return [*out, busy_note(r), ""]


def render_manager(r: dict[str, Any]) -> list[str]:
    out = [
        "## 7. SessionManager",
        "",
        f"{r['sessions']} sessions of {r['tokens_per_session']} tokens (a shared "
        f"{r['system_prompt_tokens']}-token system prompt), n_ctx {r['n_ctx']}, f16, in a fresh directory "
        "per run: create them all (the first encodes the prompt, the others restore it), save each, load "
        "each from the live set (memory, after checking the stored version: one read of the session's "
        "header), then from disk in a fresh manager (read, verify, restore into a "
        "new context). Per operation: the median over the sessions of a run, then the median of "
        f"{len(r['runs'])} runs after a warm-up. "
        f"System-prompt tokens decoded per run: {r['prefill_tokens']} (one prefill for all sessions).",
        "",
    ]
    rows = [
        ["create the first session (prefill of the system prompt)", ms(r["first_create_seconds"])],
        [
            "create each other session (restore of the encoded prompt, save)",
            ms(r["create_from_shared_prompt_seconds"]),
        ],
        [f"create all {r['sessions']}", ms(r["create_all_seconds"])],
        ["save one session (atomic, fsync)", ms(r["save_seconds"])],
        ["load one session from the live set (version checked)", f"{r['load_live_seconds'] * 1e3:.4f}"],
        ["load one session from disk", ms(r["load_from_disk_seconds"])],
    ]
    out += table(["operation", "ms"], rows, "lr")
    out += [
        f"A session file is {mb(r['file_bytes_per_session'])} MB; the {r['sessions']} live contexts hold "
        f"{mb(r['live_kv_bytes'])} MB of KV cache (n_ctx cells each). Creating from the shared prompt is "
        f"{r['restore_speedup_vs_prefill']:.0f}x faster than the first creation; a live load is "
        f"{r['live_vs_disk_speedup']:,.0f}x faster than one from disk.",
        "",
    ]
    return [*out, busy_note(r), ""]


def render_signed(r: dict[str, Any]) -> list[str]:
    c, t = r["config"], r["times"]
    out = [
        "## 8. Signed sessions: load, restore and save with a secret_key",
        "",
        f"{c['tokens']} tokens, f16, n_ctx {c['n_ctx']}: sessions of {mb(r['session_bytes']['unsigned'])} MB "
        f"(unsigned) and {mb(r['session_bytes']['signed'])} MB (signed: 32 bytes more). Median of "
        f"{c['runs']} runs after a warm-up, the variants alternating (`{r['command']}`). A signed load "
        "verifies a keyed BLAKE3 MAC over the whole file (on every core) in place of the XXH3 checksum.",
        "",
    ]
    rows = []
    for op in ("load", "restore", "save"):
        unsigned, signed = t[f"{op}_unsigned"]["median"], t[f"{op}_signed"]["median"]
        rows.append([op, ms(unsigned), ms(signed), f"{signed / unsigned:.2f}x"])
    out += table(["operation", "unsigned ms", "signed ms", "signed / unsigned"], rows)
    out += [
        "",
        f"Target: a signed load within {r['target_ratio']}x of an unsigned one: "
        f"{r['load_ratio']:.2f}x, {verdict(r['meets_target'])}.",
        "",
    ]
    return out


def render_prefix_cache(r: dict[str, Any]) -> list[str]:
    c, t, decoded = r["config"], r["times"], r["prompt_tokens_decoded"]
    out = [
        "## 9. Prefix cache: the first token of a prompt that shares most of its tokens",
        "",
        f"A {c['total_tokens']}-token prompt whose first {c['shared_tokens']} tokens an earlier prompt "
        f"computed (f16, n_ctx {c['n_ctx']}), to its first new token in a fresh Context. Median of "
        f"{c['runs']} runs after a warm-up, the three alternating (`{r['command']}`). The prefix cache "
        f"is on disk, {c['chunk_tokens']}-token chunks: it restores the shared chunks and decodes the "
        f"rest. The session "
        f"file holds the {c['shared_tokens']} shared tokens.",
        "",
    ]
    names = {
        "prefix_cache": "prefix cache (`Context(..., prefix_cache=PrefixCache(dir))`)",
        "session_file": f"`load_session` of the {c['shared_tokens']}-token session, then the rest",
        "prefill": "prefill of the whole prompt",
    }
    rows = [[label, str(decoded[name]), ms(t[name]["median"])] for name, label in names.items()]
    out += table(["way to the first token", "prompt tokens decoded", "ms"], rows)
    out += [
        "",
        f"Target: within {r['target_ratio']}x of the session file: {r['ratio_to_session_file']:.2f}x, "
        f"{verdict(r['meets_target'])}. A full prefill takes {r['prefill_over_cache']:.1f}x as long.",
        "",
    ]
    return out


def render_chunk_length(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    out = [
        "### The chunk length",
        "",
        f"`{r['command']}`: for each chunk length, the first call (decodes a "
        f"{c['total_tokens']}-token prompt and writes its chunks to an on-disk cache; the same call "
        f"without a cache took {r['first_call_without_cache_seconds']:.2f} s), then the first token of "
        f"another prompt sharing its first {c['shared_tokens']} tokens (another one each run; median of "
        f"{c['runs']} runs after a warm-up).",
        "",
    ]
    rows = [
        [
            str(row["chunk_tokens"]),
            f"{row['first_call_seconds']:.2f}",
            str(row["chunks"]),
            f"{row['bytes_per_cached_token']:,.0f}",
            str(row["prompt_tokens_decoded"]),
            ms(row["ttft"]["median"]),
        ]
        for row in r["lengths"]
    ]
    out += table(
        [
            "chunk tokens",
            "first call s",
            "chunks",
            "bytes on disk per cached token",
            "prompt tokens decoded",
            "time to first token ms",
        ],
        rows,
    )
    out += [
        "",
        "The per-chunk overhead on disk is negligible at every length (the bytes per token are the KV "
        "rows'). What a length costs is the prompt past the last full chunk it shares, decoded again (C/2 "
        "tokens on average, the whole tail of a shared prefix that is not a multiple of C), against the "
        "lookups, files and checks of more, smaller chunks. The default stays 256: fastest here, and within "
        "one chunk of the reuse of the shorter lengths for a prefix that is a multiple of 256; 512 already "
        "decodes 256 more tokens of this prompt.",
        "",
    ]
    return out


def render_chunked_sessions(r: dict[str, Any]) -> list[str]:
    d, sl, rp = r["bytes_on_disk"], r["save_load"], r["replay"]
    t = sl["times"]
    out = [
        "### Sessions stored as chunks",
        "",
        f"`{r['command']}`, three measurements in one run (f16, n_ctx {r['config']['n_ctx']}, "
        f"{r['config']['chunk_tokens']}-token chunks, a SessionManager's default storage against "
        '`storage="files"`).',
        "",
        f"**Bytes on disk.** {d['sessions']} sessions share a {d['system_tokens']}-token system prompt; each "
        f"then holds {d['own_tokens_min']}-{d['own_tokens_max']} tokens of its own (mean "
        f"{d['own_tokens_mean']:.0f}: a user message and a {r['config']['answer_tokens']}-token answer). The "
        f"ideal is one copy of the prompt's KV plus every session's own tokens' KV "
        f"({d['kv_bytes_per_token']:,.0f} bytes per token).",
        "",
    ]
    out += table(
        ["storage", "bytes on disk", "x the ideal"],
        [
            ["ideal", f"{d['ideal_bytes']:,.0f}", "1.00"],
            [
                f"chunks ({d['chunk_files']} chunk files + {d['sessions']} manifests)",
                f"{d['chunked_bytes']:,}",
                f"{d['chunked_over_ideal']:.3f}",
            ],
            ["one file per session", f"{d['files_bytes']:,}", f"{d['files_over_ideal']:.2f}"],
        ],
    )
    out += [
        "",
        f"**Save and load** of one of those sessions ({sl['tokens']} tokens), median of "
        f"{r['config']['runs']} runs after a warm-up, the two alternating: a save of the live session "
        "(through chunks: the manifest and its tail, the shared chunks already stored) and a load into a "
        "fresh manager (through chunks: the manifest, its chunks, their checks and assembly).",
        "",
    ]
    out += table(
        ["", "chunks ms", "one file ms", "ratio"],
        [
            [
                "save",
                ms(t["save_chunks"]["median"]),
                ms(t["save_files"]["median"]),
                f"{sl['save_ratio']:.2f}x",
            ],
            [
                "load",
                ms(t["load_chunks"]["median"]),
                ms(t["load_files"]["median"]),
                f"{sl['load_ratio']:.2f}x",
            ],
        ],
    )
    lookups = rp["chunk_hits"] + rp["chunk_misses"]
    out += [
        "",
        f"**Replay** of {rp['chats']} one-turn chats: {rp['system_prompts']} system prompts ("
        f"{', '.join(f'{n:,}' for n in rp['system_prompt_tokens'])} tokens), {rp['documents']} documents ("
        f"{', '.join(str(n) for n in rp['document_tokens'])} tokens) pasted into every other "
        f"first message, a question of its own each, {rp['seconds']:.0f} s. Chunk lookups that found a "
        f"sound chunk: {rp['chunk_hits']:,} of {lookups:,} ({rp['hit_rate']:.1%}; a lookup of a prompt "
        "stops at its first miss). Prompt tokens held after the chats' messages: "
        f"{rp['prompt_tokens_held']:,}, of which {rp['prompt_tokens_decoded']:,} were decoded and "
        f"{rp['prompt_tokens_not_decoded']:,} restored (system prompts from the manager's copy, documents "
        f"from chunks). On disk: {rp['bytes_on_disk']:,} bytes against {rp['bytes_one_file_each']:,} in "
        f"one file per session ({rp['bytes_on_disk'] / rp['bytes_one_file_each']:.2f}x).",
        "",
        busy_note(r),
        "",
    ]
    return out


def render_chunk_agreement(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    return [
        "### Greedy continuations from cached chunks against fresh prefills",
        "",
        f"`{r['command']}`: chunks written by a context decoding {c['writer_n_batch']} tokens per call; then "
        f"{c['prompts']} prompts of {c['total_tokens']} tokens sharing their first {c['shared_tokens']} with "
        f"it, each continued greedily for {c['continuation_tokens']} tokens twice: from the cached chunks "
        f"(the rest decoded), and after a fresh prefill ({c['reader_n_batch']} tokens per call, so other "
        "batch boundaries and possibly other last bits of the KV rows). Measured, not asserted: "
        f"**{r['agree']} of {c['prompts']} agree** token for token; the mean common prefix is "
        f"{r['mean_common_prefix']:.1f} of {c['continuation_tokens']} tokens. (A context restored from "
        "chunks holds byte for byte the rows that computed them: that is asserted, in "
        "`rust/core/tests/prefix_cache.rs` and `chunked_sessions.rs`.)",
        "",
    ]


SYSTEM_NAMES = {
    "contexts": "one context per session",
    "batched": "batching=True",
    "shared": "batching=True, kv_cells",
    "llama_cpp_python": "llama-cpp-python, one at a time",
}


def render_batching(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    out = [
        "## 10. Continuous batching",
        "",
        f"`{r['command']}`: concurrent chats, each a {c['system_tokens']}-token system prompt restored, then "
        f"{c['turns']} turns of at most {c['max_tokens']} greedy tokens, all starting together, through a "
        "SessionManager with one context per session, one with `batching=True` (one shared context, one "
        "decode per step, a KV stream of n_ctx cells per session), the same with `kv_cells` "
        f"({c.get('cells_per_chat', '?')} per chat: the sessions share one cache), and llama-cpp-python "
        "serving the same requests one at a time (a chat's first "
        "request waits for the chats served before it). Aggregate: all chats' tokens / wall time; per chat: "
        "the median of a chat's tokens / its own duration; time to first token over every turn; KV: bytes "
        f"allocated for the live sessions (n_ctx {c['n_ctx']} each) against the bytes of the tokens they "
        "hold.",
        "",
    ]
    rows = []
    for name, label in SYSTEM_NAMES.items():
        for x in r["rows"].get(name, []):
            kv = (
                f"{x['kv_bytes_allocated'] / 2**20:.0f} / {x['kv_bytes_of_tokens_held'] / 2**20:.0f} MiB"
                if "kv_bytes_allocated" in x
                else "-"
            )
            rows.append(
                [
                    str(x["chats"]),
                    label,
                    f"{x['aggregate_tokens_per_second']:.1f}",
                    f"{x['per_chat_tokens_per_second']:.1f}",
                    f"{x['ttft_p50']:.2f}",
                    f"{x['ttft_p95']:.2f}",
                    kv,
                ]
            )
    rows.sort(key=lambda row: int(row[0]))
    out += table(
        [
            "chats",
            "system",
            "aggregate tok/s",
            "per-chat tok/s",
            "TTFT p50 s",
            "TTFT p95 s",
            "KV allocated / held",
        ],
        rows,
        "rlrrrrr",
    )
    repeats = c.get("repeats_at_target", 1)
    if repeats > 1:
        spread = "; ".join(
            f"{SYSTEM_NAMES[name]}: " + ", ".join(f"{a:.1f}" for a in x["aggregate_runs"])
            for name in SYSTEM_NAMES
            for x in r["rows"].get(name, [])
            if x["chats"] == c["target_chats"] and "aggregate_runs" in x
        )
        out += [
            "",
            f"At {c['target_chats']} chats the systems ran in turn, {repeats} times; each row is its "
            f"median run (aggregate tokens/s of every run, in order: {spread}).",
        ]
    out += [
        "",
        "The KV cache of a batching manager is `max_live` streams of `n_ctx` cells (llama.cpp's split "
        "cache), so it allocates what one context per session allocates; what it saves is one compute "
        "buffer and one thread pool for all sessions. With `kv_cells` the sessions share one cache of that "
        "many cells (llama.cpp's unified cache) and memory follows what they hold, but each token's "
        "attention walks every cell in use, masked to its own session's: each step costs more as the cache "
        "fills. Either "
        "way each session's state is byte for byte a context of its own's.",
        "",
    ]
    return out


def render_batch_ceiling(r: dict[str, Any]) -> list[str]:
    rows = []
    for run in r["runs"]:
        by_count = {x["sequences"]: x for x in run["rows"]}
        rows.append(
            [
                run["type"] + (" (the test model)" if run["type"] == "Q4_1" else ""),
                str(run["prompt_tokens"]),
                f"{by_count[1]['step_ms_median']:.1f}",
                f"{by_count[8]['step_ms_median']:.1f}",
                *(f"{by_count[n]['gain_over_one']:.2f}x" for n in (2, 4, 8, 16)),
            ]
        )
    out = [
        "### llama.cpp's own batch gain: the ceiling",
        "",
        f"`{r['command']}`: one decode step in which each of N sequences adds one token, with llama.cpp's "
        "API alone (`rust/core/examples/batch_scaling.rs`: split KV, flash attention off, 2 threads; the "
        "counts take turns, 8 rounds of 5 steps, so that the VM's drift falls on all alike), after each "
        "sequence read the given number of tokens. Gain: N sequences' tokens/s over one's. No scheduler over "
        "llama.cpp gains more than this at N generating chats, before it reads a prompt. Q8_0 and Q4_0 are "
        "the test model requantized (`bench/requantize.py`): on x86 llama.cpp batches them with tiled "
        "kernels (tinyBLAS, and repacking for Q4_0), while Q4_1 goes through a one-row dot product that "
        "costs a batched token what it costs alone.",
        "",
    ]
    out += table(
        ["type", "tokens each", "step of 1, ms", "step of 8, ms", "gain 2", "gain 4", "gain 8", "gain 16"],
        rows,
        "lrrrrrrr",
    )
    return [*out, ""]


def render_batching_agreement(r: dict[str, Any]) -> list[str]:
    parts = []
    for mode, m in r["modes"].items():
        parts.append(
            f"{mode}: **{m['agree']} of {m['chats']}** agree"
            + (
                f" (first differences at characters {m['first_difference_chars']})"
                if m["first_difference_chars"]
                else ""
            )
        )
    return [
        "### Batched chats against the same chats alone",
        "",
        f"`{r['command']}`: chats of one question ({r['max_tokens']} tokens at most), {r['at_once']} at a "
        f"time through a batching manager (up to {r['max_sessions_in_step']} sessions in one step), and each "
        'alone through the same manager; "shared kv_cells": the same chats together through a manager '
        "whose sessions share one cache, against the same solo runs. Measured, not asserted: "
        + "; ".join(parts)
        + ". A turn decoded alone in "
        "the pool equals a context of its own token for token and byte for byte (asserted in "
        "`rust/core/tests/pool.rs` and `tests/test_batching.py`).",
        "",
    ]


def render_server(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    names = {
        "ours": "llama-sessions serve",
        "theirs": "llama-cpp-python server",
        "manager": "(the server's SessionManager in process, no HTTP)",
    }
    out = [
        "## 11. OpenAI-compatible server",
        "",
        f"`{r['command']}`: `llama-sessions serve` and llama-cpp-python's server (`python -m "
        "llama_cpp.server`, its default configuration but `--interrupt_requests False`, without which each "
        f"new request cuts the answer being streamed short), each its own process with n_ctx {c['n_ctx']} "
        f"and {c['threads']} threads, driven by OpenAI's Python client over loopback. Each client: a "
        f"{c['system_tokens']}-token system prompt shared by all (read once by an untimed request first), "
        f"then {c['turns']} turns of at most {c['max_tokens']} greedy tokens, streamed; the clients start "
        "together. Tokens are the streamed content chunks (one per token on both servers). Our clients name "
        "their session (`X-Session-Id`); llama-cpp-python's server answers one request at a time, reusing "
        "the prefix its context shares with the request. The two servers ran in turn for each client count.",
        "",
    ]
    rows = []
    for name, label in names.items():
        for x in r["rows"].get(name, []):
            rows.append(
                [
                    str(x["clients"]),
                    label,
                    f"{x['aggregate_tokens_per_second']:.1f}",
                    f"{x['per_client_tokens_per_second']:.1f}",
                    f"{x['ttft_p50']:.2f}",
                    f"{x['ttft_p95']:.2f}",
                ]
            )
    rows.sort(key=lambda row: int(row[0]))
    out += table(
        ["clients", "server", "aggregate tok/s", "per-client tok/s", "TTFT p50 s", "TTFT p95 s"],
        rows,
        "rlrrrr",
    )
    returning = r.get("returning_ttft", {})
    if returning.get("ours") and returning.get("theirs"):
        ours = ", ".join(f"{t * 1000:.0f}" for t in returning["ours"])
        theirs = ", ".join(f"{t * 1000:.0f}" for t in returning["theirs"])
        out += [
            "",
            f"**Returning user after a restart**: a client of the {c['target_clients']}-client run sends its "
            f"whole conversation ({c['history_tokens_returning']} tokens for the first client) and a new "
            "question to a freshly started server; time to first token, ms, "
            f"{c['returning_users']} clients, a restart before each: llama-sessions serve {ours} (the "
            f"session restored from its files); llama-cpp-python's server {theirs} (the conversation read "
            "again).",
        ]
    return [*out, "", busy_note(r), ""]


def render_stores(r: dict[str, Any]) -> list[str]:
    out = [
        "## 12. Session stores: a local directory, Redis and S3",
        "",
        f"`{r['command']}`: a Context that read N tokens (f16, n_ctx {r['config']['n_ctx']}) saved with "
        "`SessionManager.save(id, context)` (version-checked, atomic: a file with fsync, a Redis string "
        "written under the session's lease, or an S3 object replaced only if its ETag is still the one read) "
        "and loaded with `load(id)` in a fresh manager (read, verified, restored), through a manager on a "
        "directory, one on Redis (a `redis-server` on loopback) and one on S3 (moto's S3 server on loopback, "
        "`tests/s3_server.py`: an in-memory Python server, so its column shows what the protocol costs on "
        "this machine, not a cloud's latency), each started by the script; all store sessions whole. "
        f"Medians of {r['config']['runs']} runs after a warm-up, ms.",
        "",
    ]
    rows = []
    for x in r["rows"]:
        d, k, s3 = x["directory"], x["redis"], x["s3"]
        rows.append(
            [
                str(x["tokens"]),
                mb(d["bytes"]),
                ms(d["save"]["median"]),
                ms(k["save"]["median"]),
                ms(s3["save"]["median"]),
                ms(d["load"]["median"]),
                ms(k["load"]["median"]),
                ms(s3["load"]["median"]),
            ]
        )
    out += table(
        [
            "tokens",
            "session MB",
            "save, directory",
            "save, Redis",
            "save, S3",
            "load, directory",
            "load, Redis",
            "load, S3",
        ],
        rows,
        "rrrrrrrr",
    )
    for name, title in (("redis", "Redis"), ("s3", "S3")):
        replay = r["replays"].get(name)
        if not replay:
            continue
        out += [
            "",
            f"**Two workers, one {title}:** the replay of `bench/chunked_sessions.py`, "
            f"{replay['chats']} one-turn chats (three system prompts, four documents pasted into half the "
            "messages), chat i on worker i % 2, each "
            f"worker a SessionManager on the store with a 256 MB local tier: {replay['chunk_hits']} of "
            f"{replay['chunk_lookups']} chunk lookups hit ({replay['hit_rate']:.1%}; "
            f"{replay['local_tier_hits']} from the local tiers), "
            f"{replay['prompt_tokens_held'] - replay['prompt_tokens_decoded']:,} of "
            f"{replay['prompt_tokens_held']:,} prompt tokens restored rather than decoded, "
            f"{mb(replay['bytes_to_store'])} MB sent to the store and {mb(replay['bytes_from_store'])} MB "
            f"read from it, in {replay['seconds']:.0f} s.",
        ]
    return [*out, "", busy_note(r), ""]


def render_breakdown(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    out = [
        "### Breakdown: a restore and the first new token",
        "",
        f"`python bench/breakdown.py`: {c['tokens']} tokens restored into a fresh Context, then the question "
        f"({c['question']!r}). Medians of {c['runs']} runs after a warm-up, ms.",
        "",
    ]
    rows = [[f"n_ctx {n}", ms(s["median"])] for n, s in r["reset"].items()]
    out += table(["`reset()` (clears the KV cache)", "ms"], rows)
    names = {
        "restore": "`restore(bytes)`",
        "question_only": "question, `max_tokens=0`",
        "question_and_token": "question, `max_tokens=1`",
        "one_more_token": "one more token",
    }
    rows = [[key, *(ms(v[k]["median"]) for k in names)] for key, v in r["first_token"].items()]
    out += table(["context", *names.values()], rows)
    return [*out, busy_note(r), ""]


def machine_cpu(result: dict[str, Any]) -> str:
    """The CPU a result was measured on: its model and SIMD flags."""
    m = result["environment"]["machine"]
    return f"{m['cpu_model']} ({', '.join(m['cpu_flags'])})"


def render(results: dict[str, Any]) -> str:
    lines = ["# Benchmarks", ""]
    ours = {k: r for k, r in results.items() if k in MODULES and "environment" in r}
    any_result = ours.get("restore_vs_prefill") or next(iter(ours.values()), None)
    builds = {r["environment"].get("native_build", {}).get("sha256") for r in ours.values()}
    if len(builds) > 1:
        lines += [
            "**Warning: these results come from different installed builds** ("
            + ", ".join(
                f"{k}: {r['environment'].get('native_build', {}).get('sha256')}" for k, r in ours.items()
            )
            + ").",
            "",
        ]
    if any_result:
        main_cpu = machine_cpu(any_result)
        elsewhere = {k: machine_cpu(r) for k, r in ours.items() if machine_cpu(r) != main_cpu}
        if elsewhere:
            lines += [
                "**Warning: some results come from another machine** than the one described below ("
                + ", ".join(f"{k}: {cpu}" for k, cpu in elsewhere.items())
                + "): compare their figures with each other, not with other sections'.",
                "",
            ]
        env = any_result["environment"]
        m, v, b = env["machine"], dict(env["versions"]), env["build_flags"]
        # The version of the bench environment's llama-cpp-python, from any run that found it.
        v["llama_cpp_python"] = next(
            (
                r["environment"]["versions"]["llama_cpp_python"]
                for r in ours.values()
                if r["environment"]["versions"].get("llama_cpp_python")
            ),
            None,
        )
        build = env.get("native_build", {})
        lines += [
            "Generated by `python bench/run_all.py` from `bench/results/*.json` (do not edit by hand; the "
            "prose "
            "of the findings lives in `bench/findings.md`). Each JSON file records the machine, the build "
            "flags, "
            "the versions, the date and the CPU time other processes used while it ran.",
            "",
            f"- Machine: {m['cpu_model']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, "
            f"{mb(m['memory_bytes'] or 0)} MB, Linux {m['kernel']}, Python {m['python']}.",
            f"- Versions: llama_sessions {v['llama_sessions']}, llama.cpp from {v['llama_cpp']}, "
            f"llama-cpp-python {v['llama_cpp_python']}.",
            f"- Build: RUSTFLAGS `{b['rustflags']}` (GGML_NATIVE=ON), CFLAGS/CXXFLAGS `{b['cflags']}` "
            "(ggml's AMX "
            f"matmul crashes in this VM); llama-cpp-python: CMAKE_ARGS `{b['llama_cpp_python_cmake_args']}`.",
            f"- Installed build measured: `_native` SHA-256 {build.get('sha256', '?')}, installed "
            f"{build.get('mtime', '?')}; checkout {env.get('git_revision')}.",
            f"- Model: SmolLM2-135M-Instruct Q4_1 (`{Path(env['model']).name}`), n_threads 2 unless stated.",
            "- Method: each figure is the median of at least 5 timed runs after an untimed warm-up "
            "(exceptions "
            "stated); every ratio compares figures taken in the same run of the same script. The driver "
            "waits "
            "for an idle machine before each script.",
        ]
        run_log = results.get("run_all")
        if run_log:
            per_module = run_log["module_seconds"]
            line = (
                f"- Run time: {sum(per_module.values()) / 60:.1f} minutes for the scripts' latest runs ("
                + ", ".join(f"{k} {s:.0f} s" for k, s in per_module.items())
                + "; a script that had to wait for an idle machine took that much longer)"
            )
            full = run_log.get("full_run")
            if full:
                line += (
                    f"; the last full `run_all.py` took {full['seconds'] / 60:.1f} minutes on "
                    f"{full['date'][:10]}, {full['seconds_waiting_for_idle_between_scripts']:.0f} s of it "
                    "waiting for an idle machine between scripts"
                )
            lines.append(line + ".")
        lines += [
            "",
            "llama-cpp-python (sections 3, 10 and 11; 11 runs its server, hence the `server` extra) lives in "
            "its own virtual environment, built from source for this CPU (about 12 minutes on 2 cores; "
            "`-DLLAVA_BUILD=OFF` only skips the multimodal library):",
            "",
            "```bash",
            "python3 -m venv ~/.cache/llama-sessions/bench-venv",
            'CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \\',
            '  CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 '
            '-mno-amx-bf16" \\',
            "  nice -n 10 ~/.cache/llama-sessions/bench-venv/bin/pip install --no-binary llama-cpp-python "
            f"'llama-cpp-python[server]=={v['llama_cpp_python']}'",
            "```",
        ]
        lines.append("")
    lines += ["![benchmarks](benchmarks.png)", "", "## Targets", ""]
    lines += render_targets(results)
    renderers = {
        "restore_vs_prefill": render_restore,
        "io_limit": render_io,
        "vs_llama_cpp_python": render_vs,
        "session_sizes": render_sizes,
        "memory": render_memory,
        "threads": render_threads,
    }
    for name in (
        "restore_vs_prefill",
        "io_limit",
        "vs_llama_cpp_python",
        "session_sizes",
        "memory",
        "threads",
    ):
        if name in results:
            lines += renderers[name](results[name])
        else:
            lines += [f"## {name}", "", f"Not run yet: `python bench/{name}.py`.", ""]
    if "manager_sessions" in results:
        lines += render_manager(results["manager_sessions"])
    else:
        lines += ["## 7. SessionManager", "", "Not run yet: `python bench/manager_sessions.py`.", ""]
    if "signed_load" in results:
        lines += render_signed(results["signed_load"])
    else:
        lines += ["## 8. Signed sessions", "", "Not run yet: `python bench/signed_load.py`.", ""]
    if "prefix_cache_ttft" in results:
        lines += render_prefix_cache(results["prefix_cache_ttft"])
    else:
        lines += ["## 9. Prefix cache", "", "Not run yet: `python bench/prefix_cache_ttft.py`.", ""]
    if "chunk_length" in results:
        lines += render_chunk_length(results["chunk_length"])
    if "chunked_sessions" in results:
        lines += render_chunked_sessions(results["chunked_sessions"])
    if "chunk_agreement" in results:
        lines += render_chunk_agreement(results["chunk_agreement"])
    if "batching" in results:
        lines += render_batching(results["batching"])
    if "batch_ceiling" in results:
        lines += render_batch_ceiling(results["batch_ceiling"])
    if "batching_agreement" in results:
        lines += render_batching_agreement(results["batching_agreement"])
    if "server" in results:
        lines += render_server(results["server"])
    if "stores" in results:
        lines += render_stores(results["stores"])
    if FINDINGS.exists():
        lines += [FINDINGS.read_text().rstrip(), ""]
    if "breakdown" in results:
        lines += render_breakdown(results["breakdown"])
    return "\n".join(lines)


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(18, 15))
    fig.suptitle("llama-sessions benchmarks (SmolLM2-135M Q4_1, 2 cores)")

    ax = axes[0][0]
    r = results.get("restore_vs_prefill")
    if r:
        n = [s["tokens"] for s in r["sizes"]]
        for key, label in (
            ("prefill", "prefill"),
            ("load_cold", "load_session (cold)"),
            ("load", "load_session"),
            ("restore", "restore"),
        ):
            ax.plot(n, [s[key]["total"]["median"] * 1e3 for s in r["sizes"]], "o-", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(n, [str(x) for x in n])
        ax.minorticks_off()
        ax.set_xlabel("system prompt tokens")
        ax.set_ylabel("ms to the first new token")
        ax.set_title("1. time to the first new token")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)

    ax = axes[0][1]
    r = results.get("session_sizes")
    if r:
        for kv in ("f16", "q8_0", "q4_0"):
            rows = [x for x in r["rows"] if x["kv_type"] == kv]
            (line,) = ax.plot(
                [x["tokens"] for x in rows], [x["session_bytes"] / 1e6 for x in rows], "o-", label=kv
            )
            ax.plot(
                [x["tokens"] for x in rows],
                [x["raw_kv_bytes"] / 1e6 for x in rows],
                "--",
                color=line.get_color(),
                alpha=0.5,
            )
        ax.set_xlabel("tokens")
        ax.set_ylabel("MB")
        ax.set_title("4. session file size (dashed: raw KV bytes)")
        ax.legend()
        ax.grid(True, alpha=0.3)

    ax = axes[0][2]
    r = results.get("io_limit")
    if r:
        labels = ["load", "save"]
        ours = [r["load"]["load_session"]["median"] * 1e3, r["save"]["save_session"]["median"] * 1e3]
        limit = [
            r["load"]["limit_read_copy"]["median"] * 1e3,
            r["save"]["limit_write_fsync_rename"]["median"] * 1e3,
        ]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="llama_sessions")
        ax.bar([i + 0.2 for i in x], limit, 0.4, label="limit (plain I/O)")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("ms")
        ax.set_title(f"2. against the limit ({mb(r['session_bytes'])} MB)")
        ax.legend()

    ax = axes[1][0]
    r = results.get("vs_llama_cpp_python")
    if r:
        ratios = r["ratios"]
        items = [
            ("prefill speed", ratios["prefill"]),
            ("generation speed", ratios["generation"]),
            ("save speed", ratios["save_speedup"]),
            ("load speed", ratios["load_speedup"]),
            ("file size", ratios["file_size"]),
            ("save peak memory", ratios["save_memory"]),
            ("load peak memory", ratios["load_memory"]),
        ]
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:green")
        ax.axvline(1, color="black", lw=1)
        ax.invert_yaxis()
        ax.set_xlabel("advantage of llama_sessions (x; > 1 is better)")
        ax.set_title("3. against llama-cpp-python")
        for i, (_, v) in enumerate(items):
            ax.text(v, i, f" {v:.2f}x", va="center")

    ax = axes[1][1]
    r = results.get("memory")
    if r:
        ops = ["save", "load"]
        ax.bar(ops, [r[o]["peak_above_baseline_median"] / 1e6 for o in ops], label="peak above baseline")
        ax.axhline(r["save"]["session_bytes"] / 1e6, color="black", ls="--", label="session size")
        ax.axhline(1.2 * r["save"]["session_bytes"] / 1e6, color="red", ls=":", label="target 1.2x")
        ax.set_ylabel("MB")
        ax.set_title("5. peak memory while saving / loading")
        ax.legend()

    ax = axes[1][2]
    r = results.get("threads")
    if r:
        names = list(r["configs"])
        thread_labels = {
            "one context, n_threads=2": "1 ctx x 2",
            "one context, n_threads=2, in a thread after the main thread": "1 ctx x 2\n2nd thread",
            "one context, n_threads=1": "1 ctx x 1",
            "two contexts in parallel, n_threads=1 each": "2 ctx x 1",
        }
        short = [thread_labels.get(name, name) for name in names]
        x = range(len(names))
        ax.bar(
            [i - 0.2 for i in x],
            [r["configs"][k]["aggregate_tokens_per_second"] for k in names],
            0.4,
            label="aggregate",
        )
        ax.bar(
            [i + 0.2 for i in x],
            [r["configs"][k]["per_context_tokens_per_second"] for k in names],
            0.4,
            label="per context",
        )
        ax.set_xticks(list(x), short)
        ax.set_ylabel("generated tokens/s")
        ax.set_title("6. generation throughput")
        ax.legend()

    r = results.get("batching")
    for ax, key, ylabel, title in (
        (
            axes[2][0],
            "aggregate_tokens_per_second",
            "generated tokens/s, all chats",
            "10. aggregate throughput",
        ),
        (axes[2][1], "ttft_p95", "s", "10. p95 time to first token"),
    ):
        if not r:
            ax.axis("off")
            continue
        for name, label in SYSTEM_NAMES.items():
            rows = r["rows"].get(name, [])
            ax.plot([x["chats"] for x in rows], [x[key] for x in rows], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent chats")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        ax.grid(True, alpha=0.3)
    axes[2][2].axis("off")

    fig.tight_layout()
    fig.savefig(PLOT, dpi=80)
    plt.close(fig)


def report() -> None:
    results = load_results()
    DOC.write_text(render(results))
    plot(results)
    print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")


def stale_install() -> str | None:
    """Why the interpreter running this must not measure (a missing install, or one older than the sources:
    results of another build would land in the report under this checkout's name), or None."""
    try:
        spec = importlib.util.find_spec("llama_sessions._native")
    except ModuleNotFoundError:
        spec = None
    if spec is None or spec.origin is None:
        return f"{sys.executable} has no llama_sessions installed: activate the project's environment"
    built = Path(spec.origin).stat().st_mtime
    sources = [
        ROOT / "Cargo.toml",
        ROOT / "Cargo.lock",
        *ROOT.glob("rust/**/*.rs"),
        *ROOT.glob("rust/**/Cargo.toml"),
    ]
    sources += list((ROOT / "python" / "llama_sessions").rglob("*.py"))
    newest = max(sources, key=lambda p: p.stat().st_mtime)
    if newest.stat().st_mtime > built:
        return (
            f"the llama_sessions that {sys.executable} imports ({spec.origin}) was built before "
            f"{newest.relative_to(ROOT)} last changed: run `pip install .` in the project's environment first"
        )
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=MODULES, help="run only these benchmarks")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the report")
    args = parser.parse_args()
    if not args.report_only:
        if (why := stale_install()) is not None:
            sys.exit(f"run_all.py: not measuring: {why}")
        run(list(args.only or MODULES))
    report()


if __name__ == "__main__":
    main()
