"""Sessions stored as chunks (issue 11): three measurements side by side in one run.

1. Bytes on disk of ``--sessions`` (100) sessions that share a 1,536-token system prompt, each with about 230
   tokens of its own (a different user message and a 16-token answer): a SessionManager with the default
   chunked storage against one with ``storage="files"``, and against the ideal, one copy of the prompt's KV
   plus each session's own tokens' KV. Target: chunked within 1.1x of the ideal.
2. Save and load of one of those sessions (1,536 + ~200 tokens) through chunks against one file: a save of
   the live session (``manager.save(id)``: the manifest and the cells after its last named chunk, or the whole
   file), and a load into a fresh manager (``load(id)``: the manifest, its chunks and their assembly, or the
   file). Median of ``--runs`` after a warm-up, the two alternating. Target: within 1.3x.
3. A replay of ``--chats`` (200) one-turn chats: three system prompts, four documents pasted into half of the
   first messages, a question of its own each. Chunk lookups that hit, prompt tokens restored from chunks
   rather than decoded, and the bytes on disk against one file per session.

Run: python bench/chunked_sessions.py [--sessions 100] [--chats 200] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import time
from pathlib import Path
from typing import Any

from _common import THREADS, environment, guarded_time, long_text, summary, work_dir, write_result
from llama_sessions import Model, SessionManager, default_model_path, inspect_session

SYSTEM_TOKENS = 1536
N_CTX = 4096
ANSWER_TOKENS = 16
TARGET_BYTES = 1.1
TARGET_SAVE_LOAD = 1.3
COMMAND = "python bench/chunked_sessions.py"


def system_tokens(model: Model, text: str) -> int:
    formatted = model.apply_chat_template([{"role": "system", "content": text}], add_generation_prompt=False)
    return len(model.tokenize(formatted, special=True))


def system_prompt_of(model: Model, n_tokens: int, offset: int) -> str:
    """A system prompt that the chat template and tokenizer make exactly ``n_tokens`` tokens."""
    words = long_text().split()[offset:]
    take = n_tokens
    for _ in range(40):
        text = " ".join(words[:take])
        got = system_tokens(model, text)
        if got == n_tokens:
            return text
        take += max(1, (n_tokens - got) // 2) if got < n_tokens else -max(1, (got - n_tokens) // 2)
    raise RuntimeError(f"no system prompt of exactly {n_tokens} tokens")


def user_message(i: int) -> str:
    """About 190 tokens, each message its own (overlapping windows of the text, shifted by 40 words)."""
    words = long_text().split()
    start = 1200 + (40 * i) % (len(words) - 1400)
    return "Summarize this in one sentence: " + " ".join(words[start : start + 140])


def dir_bytes(directory: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in directory.glob(f"*{suffix}"))


def fill(manager: SessionManager, system: str, sessions: int) -> None:
    for i in range(sessions):
        manager.create_session(f"s{i}", system)
        manager.chat(f"s{i}", user_message(i), ANSWER_TOKENS, temperature=0.0)


def bytes_on_disk(model: Model, root: Path, sessions: int) -> tuple[dict[str, Any], str]:
    system = system_prompt_of(model, SYSTEM_TOKENS, 0)
    chunked_dir, files_dir = root / "chunked", root / "files"
    started = time.perf_counter()
    chunked = SessionManager(model, chunked_dir, n_ctx=N_CTX, n_threads=THREADS, max_live=4)
    fill(chunked, system, sessions)
    files = SessionManager(model, files_dir, n_ctx=N_CTX, n_threads=THREADS, max_live=4, storage="files")
    fill(files, system, sessions)
    seconds = time.perf_counter() - started
    infos = [inspect_session(files_dir / f"s{i}.session") for i in range(sessions)]
    tokens = [info.token_count for info in infos]
    for i in range(sessions):
        assert inspect_session(chunked_dir / f"s{i}.session").token_count == tokens[i], "same conversations"
    kv_bytes_per_token = infos[0].state_bytes / tokens[0]
    own_tokens = [n - SYSTEM_TOKENS for n in tokens]
    ideal = kv_bytes_per_token * (SYSTEM_TOKENS + sum(own_tokens))
    chunked_bytes = dir_bytes(chunked_dir, ".session") + dir_bytes(chunked_dir / "chunks", ".kvchunk")
    files_bytes = dir_bytes(files_dir, ".session")
    return {
        "sessions": sessions,
        "system_tokens": SYSTEM_TOKENS,
        "own_tokens_mean": statistics.mean(own_tokens),
        "own_tokens_min": min(own_tokens),
        "own_tokens_max": max(own_tokens),
        "kv_bytes_per_token": kv_bytes_per_token,
        "ideal_bytes": ideal,
        "chunked_bytes": chunked_bytes,
        "chunked_manifest_bytes": dir_bytes(chunked_dir, ".session"),
        "chunk_files": len(list((chunked_dir / "chunks").glob("*.kvchunk"))),
        "files_bytes": files_bytes,
        "chunked_over_ideal": chunked_bytes / ideal,
        "files_over_ideal": files_bytes / ideal,
        "seconds_to_build_both": seconds,
    }, system


def save_and_load(model: Model, root: Path, runs: int) -> dict[str, Any]:
    dirs = {"chunks": root / "chunked", "files": root / "files"}
    storage = {"chunks": "chunks", "files": "files"}
    managers = {
        name: SessionManager(model, d, n_ctx=N_CTX, n_threads=THREADS, storage=storage[name])  # type: ignore[arg-type]
        for name, d in dirs.items()
    }
    for manager in managers.values():
        manager.load("s0")
    times: dict[str, list[float]] = {f"{op}_{name}": [] for op in ("save", "load") for name in dirs}
    for run in range(1 + runs):
        for name, manager in managers.items():
            elapsed = guarded_time(lambda manager=manager: manager.save("s0"), f"save {name}")  # type: ignore[misc]
            if run:
                times[f"save_{name}"].append(elapsed)
        for name, d in dirs.items():
            fresh = SessionManager(model, d, n_ctx=N_CTX, n_threads=THREADS, storage=storage[name])  # type: ignore[arg-type]
            elapsed = guarded_time(lambda fresh=fresh: fresh.load("s0"), f"load {name}")  # type: ignore[misc]
            assert fresh.stats["recomputed_tokens"] == 0
            if run:
                times[f"load_{name}"].append(elapsed)
    results = {key: summary(values) for key, values in times.items()}
    return {
        "tokens": inspect_session(dirs["files"] / "s0.session").token_count,
        "times": results,
        "save_ratio": results["save_chunks"]["median"] / results["save_files"]["median"],
        "load_ratio": results["load_chunks"]["median"] / results["load_files"]["median"],
    }


def replay_workload() -> tuple[list[str], list[str]]:
    """The replay's three system prompts (about 1,000 to 1,700 tokens; the exact counts do not matter here,
    they are recorded) and four documents."""
    words = long_text().split()
    systems = [" ".join(words[start : start + n]) for start, n in ((1200, 480), (1800, 690), (2600, 900))]
    documents = [" ".join(words[3600 + 500 * d : 3600 + 500 * d + 380]) for d in range(4)]
    return systems, documents


def replay_chat(i: int, systems: list[str], documents: list[str]) -> tuple[str, str]:
    """Chat ``i`` of the replay: its system prompt and its message (a document pasted into every other
    one)."""
    question = f"Question {i}: what does the text say about item {i * 7 % 101}?"
    message = f"{documents[(i // 3) % 4]}\n\n{question}" if i % 2 == 0 else question
    return systems[i % 3], message


def replay(model: Model, root: Path, chats: int) -> dict[str, Any]:
    systems, documents = replay_workload()
    directory = root / "replay"
    manager = SessionManager(model, directory, n_ctx=N_CTX, n_threads=THREADS, max_live=4)
    cache = manager.prefix_cache
    assert cache is not None
    decoded = held = 0
    started = time.perf_counter()
    for i in range(chats):
        system, message = replay_chat(i, systems, documents)
        manager.create_session(f"c{i}", system)
        manager.chat(f"c{i}", message, 8, temperature=0.0)
        stats = manager.load(f"c{i}").last_stats
        assert stats is not None
        decoded += stats.prompt_tokens
        held += manager.load(f"c{i}").token_count() - stats.generated_tokens
    seconds = time.perf_counter() - started
    cache_stats = cache.stats()
    manifests = dir_bytes(directory, ".session")
    chunk_sizes = {p.stem: p.stat().st_size for p in (directory / "chunks").glob("*.kvchunk")}
    # A session in one file holds the KV rows of its manifest's chunks and tail, and the same header.
    one_file_each = manifests + sum(
        _named_chunk_bytes(directory / f"c{i}.session", chunk_sizes) for i in range(chats)
    )
    lookups = cache_stats["hits"] + cache_stats["misses"]
    return {
        "chats": chats,
        "system_prompts": 3,
        "system_prompt_tokens": [system_tokens(model, system) for system in systems],
        "documents": 4,
        "document_tokens": [len(model.tokenize(document, add_bos=False)) for document in documents],
        "seconds": seconds,
        "chunk_hits": cache_stats["hits"],
        "chunk_misses": cache_stats["misses"],
        "hit_rate": cache_stats["hits"] / lookups if lookups else 0.0,
        "prompt_tokens_held": held,
        "prompt_tokens_decoded": decoded,
        "prompt_tokens_not_decoded": held - decoded,
        "bytes_on_disk": manifests + sum(chunk_sizes.values()),
        "bytes_one_file_each": one_file_each,
        "manager_stats": manager.stats,
    }


def _named_chunk_bytes(path: Path, chunk_sizes: dict[str, int]) -> int:
    """Bytes of the chunks the manifest at ``path`` names (its JSON header: docs/session-format.md)."""
    data = path.read_bytes()
    header_len = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(data[32 : 32 + header_len])
    return sum(chunk_sizes[c["key"]] for c in header.get("chunks", {}).get("chunks", []))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    env = environment()
    model = Model.load(default_model_path())
    root = work_dir() / "chunked-sessions"
    shutil.rmtree(root, ignore_errors=True)
    disk, _ = bytes_on_disk(model, root, args.sessions)
    print(
        f"bytes on disk, {args.sessions} sessions: chunked {disk['chunked_bytes']:,} "
        f"({disk['chunked_over_ideal']:.3f}x the ideal {disk['ideal_bytes']:,.0f}), one file each "
        f"{disk['files_bytes']:,} ({disk['files_over_ideal']:.2f}x)",
        flush=True,
    )
    save_load = save_and_load(model, root, args.runs)
    t = save_load["times"]
    print(
        f"save: chunks {t['save_chunks']['median'] * 1000:.1f} ms, "
        f"file {t['save_files']['median'] * 1000:.1f} ms "
        f"({save_load['save_ratio']:.2f}x); load: chunks {t['load_chunks']['median'] * 1000:.1f} ms, file "
        f"{t['load_files']['median'] * 1000:.1f} ms ({save_load['load_ratio']:.2f}x)",
        flush=True,
    )
    replayed = replay(model, root, args.chats)
    print(
        f"replay of {args.chats} chats: chunk hit rate {replayed['hit_rate']:.1%} "
        f"({replayed['chunk_hits']} of {replayed['chunk_hits'] + replayed['chunk_misses']} lookups), "
        f"{replayed['prompt_tokens_not_decoded']:,} of {replayed['prompt_tokens_held']:,} prompt tokens not "
        f"decoded, {replayed['bytes_on_disk']:,} bytes on disk against {replayed['bytes_one_file_each']:,} "
        "in one file per session",
        flush=True,
    )
    targets = [
        {
            "name": f"{args.sessions} sessions sharing a {SYSTEM_TOKENS}-token prompt: bytes on disk / ideal",
            "measured": f"{disk['chunked_over_ideal']:.3f}x",
            "target": f"<= {TARGET_BYTES}x",
            "pass": disk["chunked_over_ideal"] <= TARGET_BYTES,
            "command": COMMAND,
        },
        {
            "name": "save through chunks / one file",
            "measured": f"{save_load['save_ratio']:.2f}x",
            "target": f"<= {TARGET_SAVE_LOAD}x",
            "pass": save_load["save_ratio"] <= TARGET_SAVE_LOAD,
            "command": COMMAND,
        },
        {
            "name": "load through chunks / one file",
            "measured": f"{save_load['load_ratio']:.2f}x",
            "target": f"<= {TARGET_SAVE_LOAD}x",
            "pass": save_load["load_ratio"] <= TARGET_SAVE_LOAD,
            "command": COMMAND,
        },
    ]
    write_result(
        "chunked_sessions",
        {
            "environment": env,
            "command": COMMAND,
            "config": {
                "n_ctx": N_CTX,
                "chunk_tokens": 256,
                "runs": args.runs,
                "answer_tokens": ANSWER_TOKENS,
            },
            "bytes_on_disk": disk,
            "save_load": save_load,
            "replay": replayed,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
