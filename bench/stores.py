"""Session stores: save and load of 500, 2,000 and 4,000-token sessions through a SessionManager on a local
directory, on Redis (a real `redis-server` on loopback, started here) and on S3 (moto's S3 server on
loopback, tests/s3_server.py, started here: an in-memory Python server, so its figures show the protocol's
cost on this machine, not a cloud's latency).

Each session is a Context that read a prompt of N tokens (f16 KV cache, n_ctx 4096). Save: `save(id,
context)`, a version-checked atomic write of the whole session (a file with fsync, or a Redis string under
the session's lease, or an S3 object replaced only if its ETag is still the one read). Load: `load(id)` in a
fresh manager, the session read, verified and restored.
Both stores keep sessions whole (`storage="files"`), so the bytes moved are the same. Median of 5 runs
after a warm-up.

Then the chunk store's replay of 200 one-turn chats (bench/chunked_sessions.py) on two workers (managers)
sharing the Redis, then the S3 bucket, chat i on worker i % 2, each with a local tier: chunk hit rate,
prompt tokens restored rather than decoded, and the bytes sent to and read from the store.

Run: python bench/stores.py [--chats 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from _common import RUNS, THREADS, build_prompt, environment, summary, work_dir, write_result
from chunked_sessions import replay_chat, replay_workload
from llama_sessions import Context, Model, PrefixCache, SessionManager, default_model_path

SIZES = (500, 2000, 4000)
N_CTX = 4096
COMMAND = "python bench/stores.py"


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("stores.py needs redis-server (scripts/common.sh installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tempfile.mkdtemp(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(16).startswith(b"+PONG"):
                    return server, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)


S3_SERVER = Path(__file__).resolve().parent.parent / "tests" / "s3_server.py"


def start_s3() -> tuple[subprocess.Popen[str], str, str]:
    """moto's S3 server on loopback with the bucket "bench": the process, a store URL and the endpoint."""
    server = subprocess.Popen(
        [sys.executable, str(S3_SERVER), "--port", "0", "--bucket", "bench"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    ready = server.stdout.readline()  # "ready on http://127.0.0.1:PORT", with the port it bound
    if not ready.startswith("ready on http://127.0.0.1:"):
        raise SystemExit("the S3 server did not start (pip install '.[test]' installs moto)")
    port = int(ready.strip().rsplit(":", 1)[1])
    endpoint = f"http://127.0.0.1:{port}"
    options = "allow_http=true&region=us-east-1&access_key_id=bench&secret_access_key=bench"
    return server, f"s3://bench/stores?endpoint={endpoint}&{options}", endpoint


def s3_traffic(endpoint: str) -> dict[str, int]:
    """Bytes of request and response bodies the S3 server has seen since it started."""
    with urllib.request.urlopen(f"{endpoint}/_llama_sessions_traffic") as answer:
        counted: dict[str, int] = json.load(answer)
    return counted


def manager(model: Model, location: str) -> SessionManager:
    return SessionManager(model, location, n_ctx=N_CTX, n_threads=THREADS, storage="files", max_live=2)


def measure(model: Model, location: str, session: str, context: Context) -> dict[str, Any]:
    writer = manager(model, location)
    writer.save(session, context)  # warm-up: the first save creates the session
    saves = []
    for _ in range(RUNS):
        started = time.perf_counter()
        writer.save(session, context)
        saves.append(time.perf_counter() - started)
    loads = []
    for _ in range(RUNS + 1):
        reader = manager(model, location)
        started = time.perf_counter()
        loaded = reader.load(session)
        loads.append(time.perf_counter() - started)
        assert loaded.tokens == context.tokens
    size = next(s.file_size for s in writer.list() if s.id == session)
    return {"save": summary(saves), "load": summary(loads[1:]), "bytes": size}


def redis_traffic(redis_url: str) -> dict[str, int]:
    """Bytes the Redis server has received and sent since it started (INFO stats)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise SystemExit("stores.py needs redis-cli (Debian's redis-tools, which redis-server brings)")
    info = subprocess.run([cli, "-u", redis_url, "INFO", "stats"], capture_output=True, text=True, check=True)
    fields = dict(line.split(":", 1) for line in info.stdout.splitlines() if ":" in line)
    return {"received": int(fields["total_net_input_bytes"]), "sent": int(fields["total_net_output_bytes"])}


def replay_on_two_workers(
    model: Model, location: str, traffic: Callable[[], dict[str, int]], root: Path, chats: int
) -> dict[str, Any]:
    """The chunk store's replay (bench/chunked_sessions.py) on two workers sharing one store, chat i on
    worker i % 2, each worker with a local tier of 256 MB: chunk hits, prompt tokens restored rather than
    decoded, and the bytes that went to and came from the store."""
    systems, documents = replay_workload()
    locals_ = [PrefixCache(root / f"local-{w}", max_bytes=256 * 2**20) for w in range(2)]
    workers = [
        SessionManager(model, location, n_ctx=N_CTX, n_threads=THREADS, max_live=4, prefix_cache=local)
        for local in locals_
    ]
    before = traffic()
    decoded = held = 0
    started = time.perf_counter()
    for i in range(chats):
        worker = workers[i % 2]
        system, message = replay_chat(i, systems, documents)
        worker.create_session(f"c{i}", system)
        worker.chat(f"c{i}", message, 8, temperature=0.0)
        stats = worker.load(f"c{i}").last_stats
        assert stats is not None
        decoded += stats.prompt_tokens
        held += stats.context_tokens
    seconds = time.perf_counter() - started
    after = traffic()
    shared = [w.prefix_cache.stats() for w in workers if w.prefix_cache is not None]
    local = [cache.stats() for cache in locals_]
    hits = sum(s["hits"] for s in shared)
    lookups = hits + sum(s["misses"] for s in shared)
    return {
        "chats": chats,
        "seconds": seconds,
        "chunk_hits": hits,
        "chunk_lookups": lookups,
        "hit_rate": hits / lookups if lookups else 0.0,
        "local_tier_hits": sum(s["hits"] for s in local),
        "prompt_tokens_held": held,
        "prompt_tokens_decoded": decoded,
        "bytes_to_store": after["received"] - before["received"],
        "bytes_from_store": after["sent"] - before["sent"],
        "manager_stats": [w.stats for w in workers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=200, help="chats of the two-worker replay")
    args = parser.parse_args()
    env = environment()
    model = Model.load(default_model_path())
    redis, redis_url = start_redis()
    s3, s3_url, s3_endpoint = start_s3()
    root = work_dir() / "stores"
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    replays = {}
    try:
        for n in SIZES:
            context = Context(model, n_ctx=N_CTX, n_threads=THREADS)
            context.generate(build_prompt(model, n), max_tokens=0)
            row: dict[str, Any] = {"tokens": len(context.tokens)}
            for name, location in (
                ("directory", str(root / "sessions")),
                ("redis", redis_url),
                ("s3", s3_url),
            ):
                row[name] = measure(model, location, f"s{n}", context)
            print(row, flush=True)
            rows.append(row)
        stores: dict[str, tuple[str, Callable[[], dict[str, int]]]] = {
            "redis": (redis_url, lambda: redis_traffic(redis_url)),
            "s3": (s3_url.replace("/stores?", "/replay?"), lambda: s3_traffic(s3_endpoint)),
        }
        for name, (location, traffic) in stores.items():
            replays[name] = replay_on_two_workers(
                model, location, traffic, root / f"replay-{name}", args.chats
            )
            print(name, replays[name], flush=True)
    finally:
        for server in (redis, s3):
            server.kill()
            server.wait()
    write_result(
        "stores",
        {
            "environment": env,
            "command": COMMAND,
            "config": {"n_ctx": N_CTX, "runs": RUNS},
            "rows": rows,
            "replays": replays,
        },
    )


if __name__ == "__main__":
    main()
