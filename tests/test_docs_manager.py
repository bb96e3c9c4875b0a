"""The examples of docs/manager.md run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

from llama_sessions import SessionManager

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "manager.md"


def test_the_multi_user_backend_example_runs(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 5
    namespace: dict[str, object] = {"session_dir": tmp_path / "sessions"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    assert sorted(p.name for p in (tmp_path / "sessions").glob("*.session")) == [
        "ada.session",
        "ada@before-offtopic.session",
        "grace.session",
        "linus.session",
    ]
    exec(compile(blocks[1], str(DOC), "exec"), namespace)
    manager = namespace["manager"]
    assert isinstance(manager, SessionManager)
    assert manager.stats["prefill_tokens"] == 0  # the restarted manager only restored
    assert len(manager.history("ada")) == 4
    exec(compile(blocks[2], str(DOC), "exec"), namespace)
    replies = namespace["replies"]
    assert isinstance(replies, list) and len(replies) == 3 and all(replies)
    assert len(manager.history("linus")) == 4
    before = len(manager.history("grace"))
    exec(compile(blocks[3], str(DOC), "exec"), namespace)  # one turn at a time
    history = manager.history("grace")
    assert len(history) == before + 2  # the closed stream's turn did not join the history
    assert history[-2] == {"role": "user", "content": "And how long do they last?"}
    assert history[-1]["content"]
    exec(compile(blocks[4], str(DOC), "exec"), namespace)  # a conversation that outgrows its context
    small, strict = namespace["small"], namespace["strict"]
    assert isinstance(small, SessionManager) and isinstance(strict, SessionManager)
    assert [m["role"] for m in small.history("kim")] == ["user", "assistant"]
    assert small.history("kim")[0]["content"] == "And then?"
    assert [m["content"] for m in strict.history("lee") if m["role"] == "user"] == ["And then?"]
    capsys.readouterr()
