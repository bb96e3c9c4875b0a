"""Sessions in remote stores: SessionManager and the server on a real ``redis-server`` (plain and TLS) and a
real S3 API server, started on loopback, several workers (processes) sharing each. Tests taking
``store_url`` run once on each store."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from typing import Any

import openai
import pytest

from doc_examples import code_blocks
from llama_sessions import (
    Context,
    InvalidParameterError,
    Model,
    PrefixCache,
    RemoteStoreError,
    SessionManager,
    SessionNotFoundError,
    delete_session,
    inspect_stored_session,
    list_sessions,
)
from manager_worker import N_BATCH, N_CTX, N_THREADS, hammer_together

from conftest import REPO, S3_BUCKET, assert_same_output, require_tool, run_cli
from server_process import running_server

WORKER = pathlib.Path(__file__).with_name("manager_worker.py")
EXAMPLE = REPO / "examples" / "two_workers.py"
SYS = "You are a helpful assistant who answers in one sentence."
QUESTIONS = ["Name a color.", "Name an animal.", "Name a city."]


def open_manager(
    model: Model, location: str, *, autosave: bool = True, prefix_cache: PrefixCache | None = None
) -> SessionManager:
    return SessionManager(
        model,
        location,
        autosave=autosave,
        n_ctx=N_CTX,
        n_batch=N_BATCH,
        n_threads=N_THREADS,
        max_live=4,
        prefix_cache=prefix_cache,
    )


def run_worker(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_a_conversation_continues_in_another_process_as_if_it_had_stayed(
    model: Model, model_path: pathlib.Path, store_url: str, tmp_path: pathlib.Path
) -> None:
    # The reference stays in one manager, on a local directory.
    alone = open_manager(model, str(tmp_path / "alone"))
    alone.create_session("u", SYS)
    answers = [alone.chat("u", q, 8, temperature=0) for q in QUESTIONS]

    worker_a = open_manager(model, store_url)
    assert worker_a.session_dir is None
    assert worker_a.location == store_url.split("?")[0]
    assert worker_a.storage == "chunks"
    assert worker_a.prefix_cache is not None and worker_a.prefix_cache.path is None
    worker_a.create_session("u", SYS)
    assert [worker_a.chat("u", q, 8, temperature=0) for q in QUESTIONS[:2]] == answers[:2]

    resumed = run_worker("chat", str(model_path), store_url, "u", QUESTIONS[2])
    assert resumed["history_before"] == alone.history("u")[:4]
    assert_same_output(resumed["text"], answers[2])
    assert resumed["tokens"] == alone.load("u").tokens
    assert resumed["stats"]["store_loads"] == 1

    # Worker A's copy is outdated now and holds nothing of its own: its next turn runs on the stored
    # version, as if the conversation had never left it.
    fourth = worker_a.chat("u", "Name a fruit.", 8, temperature=0)
    assert_same_output(fourth, alone.chat("u", "Name a fruit.", 8, temperature=0))
    fresh = open_manager(model, store_url)
    assert fresh.history("u") == alone.history("u")
    assert fresh.load("u").tokens == alone.load("u").tokens
    assert [s.id for s in list_sessions(store_url)] == ["u"]
    cli = [sys.executable, "-m", "llama_sessions", "sessions"]
    listed = subprocess.run([*cli, "list", "--dir", store_url], capture_output=True, text=True, check=True)
    assert listed.stdout.splitlines()[1].split()[:3] == ["u", str(len(alone.load("u").tokens)), "8"]
    subprocess.run([*cli, "delete", "u", "--dir", store_url], capture_output=True, text=True, check=True)
    assert list_sessions(store_url) == []
    with pytest.raises(SessionNotFoundError):
        delete_session(store_url, "u")


def test_workers_share_the_kv_chunks_of_what_their_sessions_share(model: Model, store_url: str) -> None:
    """A long system prompt one worker computed is restored by another from the chunks in Redis, and each
    session restores byte for byte what it saved."""
    system = "You answer questions about a harbour. " + " ".join(
        f"Pier {i} is for boats of size {i}." for i in range(60)
    )
    worker_a, worker_b = open_manager(model, store_url), open_manager(model, store_url)
    worker_a.create_session("a", system)
    answer_a = worker_a.chat("a", "Which pier is for size 3?", 8, temperature=0)
    created = worker_b.create_session("b", system).last_stats
    assert created is not None
    # Worker B did not decode the full chunks worker A stored: only the rest of the system prompt.
    assert created.context_tokens > 512
    assert created.prompt_tokens == created.context_tokens % 256
    assert worker_b.prefix_cache is not None and worker_b.prefix_cache.stats()["hits"] >= 2
    # A third worker continues session "a" exactly from its manifest and the shared chunks.
    worker_c = open_manager(model, store_url)
    assert worker_c.load("a").tokens == worker_a.load("a").tokens
    assert worker_c.stats["recomputed_tokens"] == 0
    assert_same_output(
        worker_c.chat("a", "And for size 4?", 8, temperature=0),
        worker_a.chat("a", "And for size 4?", 8, temperature=0),
    )
    assert answer_a


def redis_cli(redis_url: str, *args: str) -> list[str]:
    cli = require_tool("redis-cli", "Debian's redis-server brings it (redis-tools)")
    done = subprocess.run([cli, "-u", redis_url, *args], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_a_local_tier_keeps_the_chunks_a_worker_read_and_the_remote_store_stays_the_truth(
    model: Model, redis_url: str, tmp_path: pathlib.Path
) -> None:
    system = "You answer questions about a library. " + " ".join(
        f"Shelf {i} holds books of topic {i}." for i in range(70)
    )
    writer = open_manager(model, redis_url)
    writer.create_session("a", system)
    writer.chat("a", "Which shelf holds topic 5?", 8, temperature=0)
    tokens = writer.load("a").tokens
    remote_chunks = redis_cli(redis_url, "--scan", "--pattern", "llama-sessions:c:*")
    assert len(remote_chunks) >= 2

    local_dir = tmp_path / "local-tier"
    reader = open_manager(model, redis_url, prefix_cache=PrefixCache(local_dir))
    assert reader.prefix_cache is not None and reader.prefix_cache.path == local_dir
    assert reader.load("a").tokens == tokens
    local_files = sorted(p.name for p in local_dir.glob("*.kvchunk"))
    assert local_files == sorted(f"{key.removeprefix('llama-sessions:c:')}.kvchunk" for key in remote_chunks)

    # A damaged local copy is dropped and read again from Redis: nothing is recomputed.
    damaged = local_dir / local_files[0]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x00")
    again = open_manager(model, redis_url, prefix_cache=PrefixCache(local_dir))
    assert again.load("a").tokens == tokens
    assert again.stats["recomputed_tokens"] == 0

    # With the chunks gone from Redis, the local tier alone restores the session exactly.
    redis_cli(redis_url, "del", *remote_chunks)
    local_only = open_manager(model, redis_url, prefix_cache=PrefixCache(local_dir))
    assert local_only.load("a").tokens == tokens
    assert local_only.stats["recomputed_tokens"] == 0
    # Without it, a worker decodes those tokens again (never trusting what is missing).
    bare = open_manager(model, redis_url)
    assert bare.load("a").tokens == tokens
    assert bare.stats["recomputed_tokens"] > 0


def test_processes_and_threads_on_one_session_lose_and_duplicate_no_turn(
    model: Model, model_path: pathlib.Path, store_url: str
) -> None:
    turns = 2
    open_manager(model, store_url).create_session("shared", SYS)
    results = hammer_together(
        model, str(model_path), store_url, "shared", processes=2, threads=2, turns=turns
    )
    assert sorted(results) == ["p0", "p1", "t0", "t1"]
    saved = [message for result in results.values() for message in result["saved"]]
    assert len(saved) == len(set(saved)) == 4 * turns
    assert sum(result["conflicts"] for result in results.values()) >= 1, results
    history = open_manager(model, store_url).history("shared")
    assert sorted(h["content"] for h in history[::2]) == sorted(saved)
    assert [h["role"] for h in history] == ["user", "assistant"] * len(saved)


def test_a_worker_killed_mid_turn_leaves_the_last_acknowledged_turn(
    model: Model, model_path: pathlib.Path, store_url: str
) -> None:
    manager = open_manager(model, store_url)
    manager.create_session("k", SYS)
    answer = manager.chat("k", QUESTIONS[0], 8, temperature=0)
    acknowledged = manager.history("k")
    script = (
        "import sys\n"
        "from llama_sessions import Model, SessionManager\n"
        "m = SessionManager(Model.load(sys.argv[1]), sys.argv[2], n_ctx=1024, n_batch=128, n_threads=1)\n"
        "stream = m.stream_chat('k', 'Tell me a very long story.', 500, temperature=0)\n"
        "print(next(stream), flush=True)\n"
        "for piece in stream:\n"
        "    pass\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script, str(model_path), store_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline() != ""
    finally:
        worker.kill()
        worker.wait()
    after = open_manager(model, store_url)
    assert (
        after.history("k")
        == acknowledged
        == [
            {"role": "user", "content": QUESTIONS[0]},
            {"role": "assistant", "content": answer},
        ]
    )
    assert after.chat("k", QUESTIONS[1], 8, temperature=0)


def test_an_unreachable_or_unsupported_store_is_a_typed_error(model: Model) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RemoteStoreError) as unreachable:
        SessionManager(model, f"redis://:hunter2@127.0.0.1:{port}/0")
    assert isinstance(unreachable.value, ConnectionError)
    assert f"127.0.0.1:{port}" in str(unreachable.value) and "hunter2" not in str(unreachable.value)
    with pytest.raises(RemoteStoreError, match="cannot connect on s3://bucket/prefix: ") as no_s3:
        SessionManager(
            model,
            f"s3://bucket/prefix?endpoint=http://127.0.0.1:{port}&allow_http=true&region=us-east-1"
            "&access_key_id=AKIA&secret_access_key=hunter2",
        )
    assert "hunter2" not in str(no_s3.value)
    for url, found in [
        ("s3://bucket/p?colour=blue", 'found the unknown option "colour"'),
        ("s3://AKIA:hunter2@bucket/p", "found credentials or a port before the bucket"),
        ("ftp://host/dir", "found a ftp:// URL"),
        # A URL the Redis client cannot take is a parameter to fix, not a ConnectionError to retry.
        ("redis://127.0.0.1:6379/abc", "(DB a number), found redis://127.0.0.1:6379/abc ("),
        ("redis://:hunter2@127.0.0.1:99999/0", "found redis://127.0.0.1:99999/0 ("),
        ("", "found an empty path"),
        ("file://", "found an empty path"),
    ]:
        with pytest.raises(InvalidParameterError, match=re.escape(found)) as refused:
            SessionManager(model, url)
        assert "hunter2" not in str(refused.value)


def test_two_servers_on_one_store_serve_one_conversation(
    model_path: pathlib.Path, store_url: str, tmp_path: pathlib.Path
) -> None:
    """Two workers behind one endpoint: a conversation started on worker A continues on worker B, token
    for token as on one worker."""
    log = tmp_path / "servers.log"
    with (
        running_server(store_url, model_path, "--model-name", "m", log=log) as a,
        running_server(store_url, model_path, "--model-name", "m", log=log) as b,
    ):
        workers = {
            name: openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0)
            for name, s in [("a", a), ("b", b)]
        }

        def turn(worker: str, session: str, messages: list[dict[str, str]]) -> str:
            reply = workers[worker].chat.completions.create(
                model="m",
                messages=messages,  # type: ignore[arg-type]
                max_tokens=12,
                temperature=0.0,
                extra_headers={"X-Session-Id": session},
            )
            return reply.choices[0].message.content or ""

        first = [{"role": "system", "content": SYS}, {"role": "user", "content": QUESTIONS[0]}]
        moved = turn("a", "moved", first)
        assert_same_output(turn("a", "stayed", first), moved)
        second = [*first, {"role": "assistant", "content": moved}, {"role": "user", "content": QUESTIONS[1]}]
        assert_same_output(turn("b", "moved", second), turn("a", "stayed", second))
        status, session = b.json("GET", "/v1/sessions/moved")
        assert status == 200 and len(session["messages"]) == 5
        # Worker A's copy is outdated: it answers with the stored conversation, not its own.
        assert a.json("GET", "/v1/sessions/moved") == (200, session)


def test_the_two_workers_example_keeps_its_promises_on_each_store(
    model_path: pathlib.Path, store_url: str
) -> None:
    """examples/two_workers.py, as docs/deployment.md runs it: a conversation moved between two worker
    processes, two turns at once (one saved, one SessionConflictError), a worker killed mid-turn."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), store_url, "--model", str(model_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    printed = done.stdout.splitlines()

    def outcomes(lines: list[str]) -> list[str]:
        return [line for line in lines if re.match(r"\d\. |  ok: |  FAILED: |every promise|a promise", line)]

    (shown,) = [b.code for b in code_blocks(REPO / "docs" / "deployment.md") if b.language == "text"]
    assert outcomes(printed) == outcomes(shown.splitlines())
    assert len(outcomes(printed)) == 9
    (conflict,) = [line for line in printed if line.startswith("  worker B: SessionConflictError")]
    assert re.fullmatch(
        r'  worker B: SessionConflictError: session "two-workers-[0-9a-f]{8}" changed since it was loaded: '
        r"this copy derives from version 4, the store holds version 5; load it again to continue from the "
        r"stored version",
        conflict,
    ), conflict
    # The session the example used is gone; nothing else was written under a session's name.
    assert list_sessions(store_url) == []


def test_sessions_travel_over_tls_to_a_server_whose_authority_ssl_cert_file_names(
    model: Model, model_path: pathlib.Path, rediss_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = open_manager(model, rediss_url)
    assert worker.location == rediss_url
    worker.create_session("u", SYS)
    first = worker.chat("u", QUESTIONS[0], 8, temperature=0)
    resumed = run_worker("chat", str(model_path), rediss_url, "u", QUESTIONS[1])
    assert resumed["history_before"] == [
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": first},
    ]
    assert_same_output(resumed["text"], worker.chat("u", QUESTIONS[1], 8, temperature=0))
    # Without the authority, the server's certificate is refused: nothing is sent in the clear instead.
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(
        RemoteStoreError, match=re.escape("cannot connect on rediss://127.0.0.1:")
    ) as untrusted:
        open_manager(model, rediss_url)
    assert "certificate" in str(untrusted.value).lower()
    with pytest.raises(RemoteStoreError):
        open_manager(model, rediss_url.replace("rediss://", "redis://"))


def test_an_s3_store_keeps_sessions_and_chunks_as_objects_under_its_prefix_and_no_lease_behind(
    model: Model, s3_url: str, s3_endpoint: str
) -> None:
    import boto3

    system = "You answer questions about a garden. " + " ".join(
        f"Bed {i} grows plant {i}." for i in range(60)
    )
    manager = open_manager(model, s3_url)
    manager.create_session("u v", system)
    manager.chat("u v", QUESTIONS[0], 8, temperature=0)
    prefix = s3_url.split("?")[0].removeprefix(f"s3://{S3_BUCKET}/")
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    listed = s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{prefix}/")
    keys = [o["Key"].removeprefix(f"{prefix}/") for o in listed.get("Contents", [])]
    assert "v/u v" in keys
    chunks = [k for k in keys if k.startswith("c/")]
    assert len(chunks) >= 1 and all(len(k) == len("c/") + 64 for k in chunks), chunks
    assert sorted(keys) == sorted(["v/u v", *chunks])
    # The session object is the manifest a worker loads: another manager restores it exactly.
    assert open_manager(model, s3_url).load("u v").tokens == manager.load("u v").tokens


def test_the_cli_chats_shows_and_exports_a_session_in_a_store(
    model: Model, model_path: pathlib.Path, store_url: str, tmp_path: pathlib.Path
) -> None:
    """`llama-sessions chat`, `sessions show` and `export` take a store URL as `--dir`, as `sessions list`
    and `serve` do."""

    def cli(*args: str, lines: str = "") -> subprocess.CompletedProcess[str]:
        return run_cli(*args, model_path=model_path, lines=lines)

    location = store_url.split("?")[0]
    chat = ["chat", "--session", "ada", "--dir", store_url, "--max-tokens", "8"]
    first = cli(*chat, "--system", SYS, "--n-ctx", "1024", lines=f"{QUESTIONS[0]}\n")
    assert first.returncode == 0, first.stderr
    assert "created   ada" in first.stderr
    assert first.stderr.endswith(f"saved     ada in {location}\n")
    second = cli(*chat, lines=f"{QUESTIONS[1]}\n")
    assert second.returncode == 0, second.stderr
    assert "resumed   ada: " in second.stderr and ", 1 turns, in " in second.stderr
    # An existing session keeps its system prompt and context size: refused before anything is loaded.
    refused = cli(*chat, "--system", "You are verbose.", lines=f"{QUESTIONS[2]}\n")
    assert refused.returncode == 2, refused.stderr
    assert "system prompt" in refused.stderr

    # The CLI's parameters: n_ctx 1024, the rest the defaults.
    manager = SessionManager(model, store_url, n_ctx=1024)
    history = manager.history("ada")
    assert [m["content"] for m in history[::2]] == QUESTIONS[:2]
    info = inspect_stored_session(store_url, "ada")
    assert info.params is not None and info.params.n_ctx == 1024
    assert info.token_count == len(manager.load("ada").tokens)
    assert info.metadata["llama_sessions.manager"]["history"] == history
    assert info.metadata["llama_sessions.manager"]["version"] == 3
    (listed,) = list_sessions(store_url)
    assert info.total_bytes == listed.file_size
    assert info.total_bytes == info.header_bytes + info.state_bytes + 32 + 16
    assert not info.signed
    with pytest.raises(SessionNotFoundError):
        inspect_stored_session(store_url, "nobody")
    with pytest.raises(InvalidParameterError, match="invalid session_id"):
        inspect_stored_session(store_url, "../ada")

    shown = cli("sessions", "show", "ada", "--dir", store_url)
    assert shown.returncode == 0, shown.stderr
    assert f"system        {SYS}\n" in shown.stdout
    assert "".join(f"{m['role']:<13} {m['content']}\n" for m in history) in shown.stdout
    assert f"tokens        {info.token_count}\n" in shown.stdout
    missing = cli("sessions", "show", "nobody", "--dir", store_url)
    assert missing.returncode == 1 and "SessionNotFoundError" in missing.stderr

    exported = tmp_path / "ada.session"
    done = cli("export", "ada", str(exported), "--dir", store_url)
    assert done.returncode == 0, done.stderr
    ctx = Context(model, n_ctx=1024)
    ctx.load_session(exported)
    assert ctx.tokens == manager.load("ada").tokens
    absent = cli("export", "nobody", str(tmp_path / "x.session"), "--dir", store_url)
    assert absent.returncode == 1 and "SessionNotFoundError" in absent.stderr
    assert not (tmp_path / "x.session").exists()
