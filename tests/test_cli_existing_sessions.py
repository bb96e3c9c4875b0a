"""The command line on existing sessions and bad options: what an option does to a session that exists,
options checked before anything is created, `sessions show/list/delete` on one id, warnings in the CLI's
voice."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess

import pytest

from llama_sessions import (
    Context,
    InvalidParameterError,
    Model,
    SessionManager,
    SessionNotFoundError,
    delete_session,
    inspect_session,
    validate_session_id,
)

from conftest import SMALL, SYSTEM, run_cli

TERSE = "You are terse."


def chat(
    directory: pathlib.Path, model_path: pathlib.Path, *args: str, lines: str = ""
) -> subprocess.CompletedProcess[str]:
    return run_cli("chat", "--dir", str(directory), *args, model_path=model_path, lines=lines)


def stored_session(model: Model, directory: pathlib.Path, *, turn: bool = False) -> pathlib.Path:
    """Session "ada" (system prompt TERSE, n_ctx=512, user metadata) stored in ``directory``."""
    manager = SessionManager(model, directory, n_ctx=512, autosave=True)
    manager.create_session("ada", TERSE, metadata={"team": "support"})
    if turn:
        assert manager.chat("ada", "Name a color.", max_tokens=4, temperature=0)
    return manager.session_path("ada")


# Item 11: chat on an existing session


def test_chat_refuses_another_system_prompt_for_an_existing_session(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    path = stored_session(model, tmp_path)
    before = path.read_bytes()
    refused = chat(tmp_path, model_path, "--session", "ada", "--system", "You are verbose.")
    assert refused.returncode == 2
    assert refused.stderr == (
        f"llama-sessions: session 'ada' already has a system prompt ({TERSE!r}); --system applies only when "
        "creating a session, and a session keeps its system prompt: leave out --system to resume it, or "
        "choose another --session\n"
    )
    assert refused.stdout == ""
    assert path.read_bytes() == before
    # The system prompt the session has is no change: it resumes.
    same = chat(tmp_path, model_path, "--session", "ada", "--system", TERSE)
    assert same.returncode == 0, same.stderr
    assert "resumed   ada: " in same.stderr


def test_chat_refuses_a_system_prompt_for_an_existing_session_without_one(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    SessionManager(model, tmp_path, n_ctx=512, autosave=True).create_session("bare")
    refused = chat(tmp_path, model_path, "--session", "bare", "--system", TERSE)
    assert refused.returncode == 2
    assert refused.stderr.startswith(
        "llama-sessions: session 'bare' already exists without a system prompt; --system applies only when "
        "creating a session"
    )


def test_chat_n_ctx_on_an_existing_session_names_the_option_and_the_saved_value(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    path = stored_session(model, tmp_path)
    before = path.read_bytes()
    refused = chat(tmp_path, model_path, "--session", "ada", "--n-ctx", "1024")
    assert refused.returncode == 2
    assert refused.stderr == (
        "llama-sessions: session 'ada' was created with n_ctx=512, not --n-ctx 1024: a session keeps the "
        "context parameters it was created with; leave out --n-ctx to resume it with them\n"
    )
    assert "from_session" not in refused.stderr
    assert path.read_bytes() == before
    # Without --n-ctx it resumes with the saved size (it used to be compared with a default of 4096).
    resumed = chat(tmp_path, model_path, "--session", "ada", "--max-tokens", "4", lines="Name a city.\n")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("assistant> ") and len(resumed.stdout) > len("assistant> \n")
    assert inspect_session(path).params.n_ctx == 512  # type: ignore[union-attr]
    # The saved size given explicitly is no change either.
    again = chat(tmp_path, model_path, "--session", "ada", "--n-ctx", "512")
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--max-tokens", "-3", "expected a whole number of at least 1, got -3"),
        ("--max-tokens", "0", "expected a whole number of at least 1, got 0"),
        ("--max-tokens", "many", "expected a whole number of at least 1, got 'many'"),
        ("--n-ctx", "-512", "expected a whole number of at least 1, got -512"),
        ("--temperature", "-1", "expected a finite number of at least 0, got -1"),
        ("--temperature", "nan", "expected a finite number of at least 0, got nan"),
    ],
)
def test_chat_options_are_checked_before_anything_is_created(
    model_path: pathlib.Path, tmp_path: pathlib.Path, option: str, value: str, expected: str
) -> None:
    directory = tmp_path / "sessions"
    result = chat(directory, model_path, "--session", "new", "--system", TERSE, option, value, lines="hi\n")
    assert result.returncode == 2
    assert result.stderr.endswith(f"llama-sessions chat: error: argument {option}: {expected}\n")
    assert not directory.exists()


def test_chat_refuses_a_bad_id_or_context_size_before_creating_a_session(
    model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    bad_id = chat(tmp_path, model_path, "--session", "ada ", lines="hi\n")
    assert bad_id.returncode == 1
    assert bad_id.stderr.startswith("llama-sessions: InvalidParameterError: invalid session_id: ")
    too_big = chat(tmp_path, model_path, "--session", "ada", "--n-ctx", "99999999", lines="hi\n")
    assert too_big.returncode == 1
    assert too_big.stderr.startswith("llama-sessions: InvalidParameterError: invalid n_ctx: ")
    assert list(tmp_path.glob("*.session")) == []


def test_chat_help_says_what_options_do_to_an_existing_session(model_path: pathlib.Path) -> None:
    shown = run_cli("chat", "--help", model_path=model_path)
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "an existing session keeps its own: a different one is refused" in text
    assert (
        "an existing session resumes with the one it was created with, and a different value is refused"
        in text
    )


# Item 12: ids, delete, inspect --json, sessions show/list, verify's warning


@pytest.mark.parametrize("session_id", ["ada ", " ada", "ada\u00a0", "\u2003ada", "ada\u3000"])
def test_ids_neither_start_nor_end_with_whitespace(session_id: str) -> None:
    with pytest.raises(
        InvalidParameterError, match=r"not starting or ending with whitespace \(it starts or ends"
    ):
        validate_session_id(session_id)


def test_the_id_rule_of_the_docs_is_the_one_enforced() -> None:
    validate_session_id("a b")  # inner spaces are fine
    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "manager.md").read_text(encoding="utf-8")
    assert "does not start with a dot, and neither starts nor ends with whitespace" in " ".join(doc.split())


def test_delete_removes_the_session_its_checkpoints_and_their_lock_files(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    manager = SessionManager(model, tmp_path, n_ctx=512, autosave=True)
    for session_id in ("ada", "bob"):
        manager.create_session(session_id, TERSE)
        manager.checkpoint(session_id, "start")
    assert sorted(os.listdir(tmp_path)) == [
        ".ada.lock",
        ".ada@start.lock",
        ".bob.lock",
        ".bob@start.lock",
        "ada.session",
        "ada@start.session",
        "bob.session",
        "bob@start.session",
        "chunks",
    ]
    deleted = run_cli("sessions", "delete", "ada", "--dir", str(tmp_path), model_path=model_path)
    assert deleted.returncode == 0, deleted.stderr
    assert sorted(os.listdir(tmp_path)) == [
        ".bob.lock",
        ".bob@start.lock",
        "bob.session",
        "bob@start.session",
        "chunks",
    ]
    manager.delete("bob")
    # What is left is the manager's chunk directory (these short sessions named no chunk).
    assert os.listdir(tmp_path) == ["chunks"]
    assert os.listdir(tmp_path / "chunks") == []
    # A delete of nothing leaves nothing behind either (its lock was taken, then removed).
    with pytest.raises(SessionNotFoundError):
        delete_session(tmp_path, "ada")
    assert os.listdir(tmp_path) == ["chunks"]
    # The manager works on as before: a new session takes a fresh lock file.
    manager.create_session("cid", TERSE)
    assert sorted(os.listdir(tmp_path)) == [".cid.lock", "chunks", "cid.session"]


def test_inspect_json_prints_the_header_as_stored(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    ctx.generate(SYSTEM, max_tokens=0)
    path = tmp_path / "s.session"
    ctx.save_session(path, metadata={"user": "ada", "turns": [1, 2]})
    result = run_cli("inspect", str(path), "--json", model_path=model_path)
    assert result.returncode == 0, result.stderr
    data = path.read_bytes()
    (header_length,) = struct.unpack_from("<I", data, 12)  # docs/session-format.md: the prelude
    stored = json.loads(data[32 : 32 + header_length])
    assert json.loads(result.stdout) == stored
    assert stored["sequences"] == [
        {"seq": 0, "tokens": ctx.tokens, "state_bytes": inspect_session(path).state_bytes}
    ]
    assert stored["metadata"] == {"user": "ada", "turns": [1, 2]}
    # The fields documented in docs/session-format.md are the ones written.
    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "session-format.md").read_text(
        encoding="utf-8"
    )
    documented = json.loads(doc.split("```json\n", 1)[1].split("```", 1)[0])
    assert set(documented) == set(stored)
    assert set(documented["model"]) == set(stored["model"])
    assert set(documented["params"]) == set(stored["params"])
    assert set(documented["sequences"][0]) == set(stored["sequences"][0])


def test_inspect_json_of_a_llama_cpp_file(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    ctx.generate(SYSTEM, max_tokens=0)
    path = tmp_path / "prompt.cache"
    ctx.save_session(path, format="llama.cpp")
    result = run_cli("inspect", str(path), "--json", model_path=model_path)
    assert result.returncode == 0, result.stderr
    info = inspect_session(path)
    assert json.loads(result.stdout) == {
        "format": "llama.cpp",
        "format_version": info.format_version,
        "sequences": [{"seq": 0, "tokens": ctx.tokens, "state_bytes": info.state_bytes}],
    }


def test_sessions_show_prints_the_history_once(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    stored_session(model, tmp_path, turn=True)
    shown = run_cli("sessions", "show", "ada", "--dir", str(tmp_path), model_path=model_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("Name a color.") == 1
    assert shown.stdout.count(TERSE) == 1
    assert 'metadata      {"team": "support"}\n' in shown.stdout
    assert "\nuser          Name a color.\nassistant     " in shown.stdout


def test_sessions_list_with_an_id_lists_that_session_only(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    manager = SessionManager(model, tmp_path, n_ctx=512, autosave=True)
    manager.create_session("ada", TERSE)
    manager.create_session("bob", TERSE)
    one = run_cli("sessions", "list", "bob", "--dir", str(tmp_path), model_path=model_path)
    assert one.returncode == 0, one.stderr
    rows = one.stdout.splitlines()
    assert rows[0].split() == ["id", "tokens", "messages", "bytes", "updated"]
    assert [row.split()[0] for row in rows[1:]] == ["bob"]
    missing = run_cli("sessions", "list", "zed", "--dir", str(tmp_path), model_path=model_path)
    assert missing.returncode == 1
    assert missing.stderr == f"llama-sessions: SessionNotFoundError: no session 'zed' in {tmp_path}\n"
    hostile = run_cli("sessions", "list", "../x", "--dir", str(tmp_path), model_path=model_path)
    assert hostile.returncode == 1
    assert hostile.stderr.startswith("llama-sessions: InvalidParameterError: invalid session_id")


def test_verify_of_a_llama_cpp_file_warns_in_one_line(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    ctx.generate(SYSTEM, max_tokens=0)
    path = tmp_path / "prompt.cache"
    ctx.save_session(path, format="llama.cpp")
    loaded = run_cli("verify", str(path), "--model", str(model_path), model_path=model_path)
    assert loaded.returncode == 0, loaded.stderr
    [line] = loaded.stderr.splitlines()
    assert line.startswith(
        f"llama-sessions: warning: SessionInteropWarning: {path} is a llama.cpp session file"
    )
    assert ".py:" not in loaded.stderr and "warn(" not in loaded.stderr
