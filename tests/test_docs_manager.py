"""The examples of docs/manager.md run as written, in order (by the rule of tests/doc_examples.py), and do
what the page says."""

from __future__ import annotations

import pathlib

import pytest

from doc_examples import ROOT, DocumentRun
from llama_sessions import SessionManager, inspect_session


def test_the_multi_user_backend_example_runs(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    model_path: pathlib.Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    run = DocumentRun(ROOT / "docs" / "manager.md", model_path)
    assert [b.language for b in run.blocks] == ["python"] * 6 + ["bash"]
    run.run_through_python(1)
    assert sorted(p.name for p in (tmp_path / "sessions").glob("*.session")) == [
        "ada.session",
        "ada@before-offtopic.session",
        "grace.session",
        "linus.session",
    ]
    run.run_through_python(2)
    manager = run.namespace["manager"]
    assert isinstance(manager, SessionManager)
    assert manager.stats["prefill_tokens"] == 0  # the restarted manager only restored
    assert len(manager.history("ada")) == 4
    run.run_through_python(3)
    replies = run.namespace["replies"]
    assert isinstance(replies, list) and len(replies) == 3 and all(replies)
    assert len(manager.history("linus")) == 4
    before = len(manager.history("grace"))
    run.run_through_python(4)  # one turn at a time
    history = manager.history("grace")
    assert len(history) == before + 2  # the closed stream's turn did not join the history
    assert history[-2] == {"role": "user", "content": "And how long do they last?"}
    assert history[-1]["content"]
    run.run_through_python(5)  # a conversation that outgrows its context
    small, strict = run.namespace["small"], run.namespace["strict"]
    assert isinstance(small, SessionManager) and isinstance(strict, SessionManager)
    assert [m["role"] for m in small.history("kim")] == ["user", "assistant"]
    assert small.history("kim")[0]["content"] == "And then?"
    assert [m["content"] for m in strict.history("lee") if m["role"] == "user"] == ["And then?"]
    run.run_through_python(6)  # batching
    batched = run.namespace["batched"]
    assert isinstance(batched, SessionManager) and batched.batching
    assert sorted(run.namespace["answers"]) == ["ada", "bob"] and all(run.namespace["answers"].values())
    assert batched.stats["batch_steps"] > 0
    shared = run.namespace["shared"]
    assert isinstance(shared, SessionManager)
    assert (shared.kv_cells, shared.live_kv_bytes()) == (2048, 2048 * 23_040)
    assert capsys.readouterr().out.endswith("True ['ada', 'bob'] True\n2048 45\n")
    run.run_rest()  # the command line: create, resume, list, show, export, collect, delete "bob"
    created, resumed, listed, shown, exported, collected, deleted = run.commands
    assert "created   bob" in created.stderr and "resumed   bob: " in resumed.stderr
    assert [row.split()[0] for row in listed.stdout.splitlines()[1:]] == [
        "ada",
        "bob",
        "grace",
        "kim",
        "lee",
        "linus",
    ]
    assert "system        You are terse." in shown.stdout
    assert exported.stdout.startswith("exported  bob: ")
    assert inspect_session(tmp_path / "bob.session").chunks is None  # one self-contained file
    assert collected.stdout.startswith(f"{pathlib.Path('sessions') / 'chunks'}: removed 0 corrupt chunks")
    assert deleted.stdout == "deleted   bob\n"
    assert not (tmp_path / "sessions" / "bob.session").exists()
