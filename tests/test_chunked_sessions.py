"""A SessionManager's default storage from Python: sessions are manifests naming KV chunks in
``session_dir/chunks``, so that what they share is stored once; a restarted manager continues them exactly;
a missing chunk is decoded again and counted; export() and ``llama-sessions export`` write one file that a
plain Context loads, while the manifest itself is refused by one with SessionVersionError; ``cache gc``
never evicts a chunk a stored session names; wrong arguments get exact exception types."""

from __future__ import annotations

import pathlib

import pytest

from llama_sessions import (
    Context,
    InvalidParameterError,
    Model,
    PrefixCache,
    SessionManager,
    SessionVersionError,
    inspect_session,
)

from conftest import assert_same_output, run_cli

C = 32
SMALL = {"n_ctx": 1024, "n_batch": 64, "n_threads": 2}
SYSTEM = "".join(f"Rule {i}: the lighthouse keeper logs ship number {i} at dusk. " for i in range(12))
QUESTIONS = {"a": "Name a color.", "b": "Name a city."}


def chunked(model: Model, directory: pathlib.Path, max_bytes: int = 1 << 30) -> SessionManager:
    cache = PrefixCache(directory / "chunks", chunk_tokens=C, max_bytes=max_bytes)
    return SessionManager(model, directory, **SMALL, prefix_cache=cache)


def two_sessions(manager: SessionManager) -> dict[str, str]:
    answers = {}
    for session_id, question in QUESTIONS.items():
        manager.create_session(session_id, SYSTEM)
        answers[session_id] = manager.chat(session_id, question, 10, temperature=0.0)
    return answers


def chunk_files(directory: pathlib.Path) -> set[str]:
    return {path.name for path in (directory / "chunks").glob("*.kvchunk")}


def test_sessions_are_manifests_of_shared_chunks_and_resume_exactly(
    model: Model, tmp_path: pathlib.Path
) -> None:
    manager = chunked(model, tmp_path)
    assert manager.storage == "chunks"
    two_sessions(manager)
    tokens = {session_id: manager.load(session_id).tokens for session_id in QUESTIONS}
    named = {}
    for session_id in QUESTIONS:
        info = inspect_session(tmp_path / f"{session_id}.session")
        assert info.chunks == len(tokens[session_id]) // C
        named[session_id] = info.chunks
    # The system prompt's chunks are on disk once: fewer files than the chunks the two manifests name.
    assert len(chunk_files(tmp_path)) < named["a"] + named["b"]
    # A new manager on the same directory restores them without decoding a token.
    again = chunked(model, tmp_path)
    for session_id in QUESTIONS:
        assert again.load(session_id).tokens == tokens[session_id]
    assert again.stats["recomputed_tokens"] == 0
    assert again.stats["prefill_tokens"] == 0


def test_a_restarted_manager_answers_as_the_uninterrupted_one(model: Model, tmp_path: pathlib.Path) -> None:
    uninterrupted = chunked(model, tmp_path / "one")
    two_sessions(uninterrupted)
    expected = uninterrupted.chat("a", "And an animal?", 10, temperature=0.0)
    first = chunked(model, tmp_path / "two")
    two_sessions(first)
    del first
    restarted = chunked(model, tmp_path / "two")
    assert_same_output(restarted.chat("a", "And an animal?", 10, temperature=0.0), expected)
    assert restarted.stats["recomputed_tokens"] == 0


def test_a_missing_chunk_is_decoded_again_and_counted(model: Model, tmp_path: pathlib.Path) -> None:
    manager = chunked(model, tmp_path)
    two_sessions(manager)
    tokens = manager.load("a").tokens
    del manager
    for path in (tmp_path / "chunks").glob("*.kvchunk"):
        path.unlink()
    again = chunked(model, tmp_path)
    assert again.load("a").tokens == tokens
    assert again.stats["recomputed_tokens"] == len(tokens)
    # Decoded again, the chunks are offered to the cache again.
    assert len(chunk_files(tmp_path)) == len(tokens) // C


def test_export_writes_one_file_a_plain_context_loads(model: Model, tmp_path: pathlib.Path) -> None:
    manager = chunked(model, tmp_path / "sessions")
    two_sessions(manager)
    tokens = manager.load("b").tokens
    info = manager.export("b", tmp_path / "b.session")
    assert info.chunks is None
    assert info.token_count == len(tokens)
    plain = Context(model, **SMALL)
    plain.load_session(tmp_path / "b.session")
    assert plain.tokens == tokens
    # The exported state continues the conversation as the manager's session does.
    messages = [{"role": "system", "content": SYSTEM}, *manager.history("b")]
    messages.append({"role": "user", "content": "And a river?"})
    expected = manager.chat("b", "And a river?", 10, temperature=0.0)
    assert_same_output(plain.chat(messages, 10, temperature=0.0), expected)
    assert plain.last_stats is not None
    assert plain.last_stats.prompt_tokens < 20  # only the new turn was decoded

    other = Context(model, **SMALL)
    with pytest.raises(SessionVersionError, match="llama-sessions export ID FILE"):
        other.load_session(tmp_path / "sessions" / "a.session")
    assert other.token_count() == 0


def test_the_export_command_writes_one_file(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    manager = SessionManager(model, tmp_path / "sessions", **SMALL)
    manager.create_session("a", SYSTEM)
    manager.chat("a", "Name a color.", 8, temperature=0.0)
    tokens = manager.load("a").tokens
    exported = run_cli(
        "export", "a", str(tmp_path / "a.session"), "--dir", str(tmp_path / "sessions"), model_path=model_path
    )
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith(f"exported  a: {len(tokens)} tokens")
    plain = Context(model, **SMALL)
    plain.load_session(tmp_path / "a.session")
    assert plain.tokens == tokens
    missing = run_cli(
        "export",
        "nobody",
        str(tmp_path / "x.session"),
        "--dir",
        str(tmp_path / "sessions"),
        model_path=model_path,
    )
    assert missing.returncode == 1
    assert "SessionNotFoundError: no session 'nobody'" in missing.stderr
    assert not (tmp_path / "x.session").exists()


def test_cache_gc_never_evicts_a_chunk_a_stored_session_names(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    manager = chunked(model, tmp_path)
    two_sessions(manager)
    for session_id in QUESTIONS:
        assert inspect_session(tmp_path / f"{session_id}.session").chunks
    del manager
    before = chunk_files(tmp_path)
    collected = run_cli(
        "cache", "gc", "--dir", str(tmp_path / "chunks"), "--max-bytes", "1", model_path=model_path
    )
    assert collected.returncode == 0, collected.stderr
    assert chunk_files(tmp_path) == before
    assert f"kept {len(before)} " in collected.stdout
    assert "named by stored sessions" in collected.stdout


def test_storage_arguments_are_checked(model: Model, tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidParameterError, match='"chunks" or "files"'):
        SessionManager(model, tmp_path, storage="chunk")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="in memory"):
        SessionManager(model, tmp_path, prefix_cache=PrefixCache(chunk_tokens=C))
    files = SessionManager(model, tmp_path / "files", **SMALL, storage="files")
    assert files.storage == "files"
    assert files.prefix_cache is None
    files.create_session("a", SYSTEM)
    assert inspect_session(tmp_path / "files" / "a.session").chunks is None
    assert not (tmp_path / "files" / "chunks").exists()
    default = SessionManager(model, tmp_path / "default", **SMALL)
    assert default.prefix_cache is not None
    assert default.prefix_cache.path == tmp_path / "default" / "chunks"
    assert default.prefix_cache.chunk_tokens == 256
    with pytest.raises(InvalidParameterError, match="an existing session directory"):
        default.prefix_cache.pin_sessions(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    assert default.prefix_cache.pin_sessions(tmp_path / "default") == 0
