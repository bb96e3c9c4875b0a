"""`llama-sessions chat` and `llama-sessions sessions`, run as a user runs them."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from llama_sessions import (
    Context,
    InvalidParameterError,
    Model,
    SessionCorruptError,
    SessionManager,
    SessionNotFoundError,
    delete_session,
    inspect_session,
    inspect_stored_session,
    list_sessions,
)

from conftest import run_cli


def chat(
    directory: pathlib.Path, model_path: pathlib.Path, *args: str, lines: str
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "chat", "--dir", str(directory), "--n-ctx", "1024", *args, model_path=model_path, lines=lines
    )


def test_chat_persists_and_resumes(tmp_path: pathlib.Path, model_path: pathlib.Path) -> None:
    first = chat(
        tmp_path,
        model_path,
        "--session",
        "ada",
        "--system",
        "You are terse.",
        "--max-tokens",
        "8",
        lines="Name a color.\nName an animal.\n",
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("assistant> ") == 2
    assert "created   ada" in first.stderr
    second = chat(tmp_path, model_path, "--session", "ada", "--max-tokens", "8", lines="Name a city.\n")
    assert second.returncode == 0, second.stderr
    assert "resumed   ada: " in second.stderr and ", 2 turns, in " in second.stderr
    [stored] = list_sessions(tmp_path)
    assert stored.id == "ada" and stored.message_count == 6 and stored.version == 4

    listed = run_cli("sessions", "list", "--dir", str(tmp_path), model_path=model_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:3] == ["ada", str(stored.token_count), "6"]
    shown = run_cli("sessions", "show", "ada", "--dir", str(tmp_path), model_path=model_path)
    assert shown.returncode == 0, shown.stderr
    assert "system        You are terse." in shown.stdout
    assert "user          Name a city." in shown.stdout
    deleted = run_cli("sessions", "delete", "ada", "--dir", str(tmp_path), model_path=model_path)
    assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted   ada"
    assert list_sessions(tmp_path) == []
    again = run_cli("sessions", "delete", "ada", "--dir", str(tmp_path), model_path=model_path)
    assert again.returncode == 1
    assert again.stderr.startswith("llama-sessions: SessionNotFoundError: ")


def test_sessions_rejects_hostile_ids(tmp_path: pathlib.Path, model_path: pathlib.Path) -> None:
    (tmp_path / "x.session").write_bytes(b"not a session")
    for bad in ("../x", "/etc/passwd", "a/b"):
        result = run_cli("sessions", "delete", bad, "--dir", str(tmp_path), model_path=model_path)
        assert result.returncode == 1
        assert result.stderr.startswith("llama-sessions: InvalidParameterError: invalid session_id")
    assert (tmp_path / "x.session").exists()
    listed = run_cli("sessions", "list", "--dir", str(tmp_path), model_path=model_path)
    assert listed.returncode == 0
    assert "x                        unreadable: " in listed.stdout


def test_a_header_larger_than_the_first_read_is_listed_whole(tmp_path: pathlib.Path, model: Model) -> None:
    """Reading a stored header takes one read of 16 KiB, and a second one only for a larger header: a session
    whose metadata alone is 40 KB is listed with all of it, and one of a few hundred bytes too."""
    ctx = Context(model, n_ctx=256)
    ctx.generate("Hello there.", max_tokens=0)
    notes = "n" * 40_000
    (tmp_path / "sessions").mkdir()
    ctx.save_session(tmp_path / "sessions" / "big.session", metadata={"notes": notes})
    ctx.save_session(tmp_path / "sessions" / "small.session", metadata={"notes": "short"})
    big, small = list_sessions(tmp_path / "sessions")
    assert (big.id, big.error, big.token_count, big.metadata) == (
        "big",
        None,
        len(ctx.tokens),
        {"notes": notes},
    )
    assert (small.id, small.error, small.metadata) == ("small", None, {"notes": "short"})


def test_inspect_stored_session_reads_the_header_alone_and_agrees_with_inspect_session(
    model: Model, tmp_path: pathlib.Path
) -> None:
    key = b"a secret key of 32 bytes, really"
    for secret in (None, key):
        directory = tmp_path / ("signed" if secret else "plain")
        manager = SessionManager(model, directory, n_ctx=512, secret_key=secret)
        manager.create_session("ada", "You are terse.", metadata={"team": "support"})
        manager.chat("ada", "Name a color.", 4, temperature=0)
        stored = inspect_stored_session(directory, "ada")
        whole = inspect_session(directory / "ada.session", secret_key=secret)
        for name in [
            "format",
            "format_version",
            "header_bytes",
            "state_bytes",
            "total_bytes",
            "signed",
            "token_count",
            "sequences",
            "metadata",
            "model_fingerprint",
            "created_at",
            "library_version",
        ]:
            assert getattr(stored, name) == getattr(whole, name), name
        assert stored.params is not None and whole.params is not None
        assert (
            (stored.params.n_ctx, stored.params.type_k)
            == (whole.params.n_ctx, whole.params.type_k)
            == (512, "f16")
        )
        assert stored.total_bytes == (directory / "ada.session").stat().st_size
        assert stored.signed == (secret is not None)

    # The state is not read: a changed state byte passes here; inspect_session (and any load) refuses it.
    plain = tmp_path / "plain"
    value = bytearray((plain / "ada.session").read_bytes())
    value[-20] ^= 0xFF
    (plain / "bob.session").write_bytes(bytes(value))
    assert (
        inspect_stored_session(plain, "bob").token_count == inspect_stored_session(plain, "ada").token_count
    )
    with pytest.raises(SessionCorruptError):
        inspect_session(plain / "bob.session")
    # A value that is not a session is refused, read no further than its prelude.
    (plain / "junk.session").write_bytes(b"not a session" * 1000)
    with pytest.raises(SessionCorruptError, match=r"junk\.session"):
        inspect_stored_session(plain, "junk")
    with pytest.raises(SessionNotFoundError):
        inspect_stored_session(plain, "nobody")


def test_reading_a_directory_that_does_not_exist_creates_nothing(tmp_path: pathlib.Path) -> None:
    """A mistyped path holds no session, and is not left behind as an empty directory."""
    missing = tmp_path / "typo"
    assert list_sessions(missing) == []
    with pytest.raises(SessionNotFoundError):
        inspect_stored_session(missing, "ada")
    with pytest.raises(SessionNotFoundError):
        delete_session(missing, "ada")
    with pytest.raises(InvalidParameterError, match="invalid session_id"):
        delete_session(missing, "../ada")
    assert not missing.exists()
    with pytest.raises(InvalidParameterError, match="found an empty path"):
        list_sessions("")
