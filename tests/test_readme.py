"""The README's Python examples run as written, in order, in one namespace."""

from __future__ import annotations

import pathlib
import re

import pytest

from llama_sessions import Context

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_and_sessions_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 3, "the README has a quick start, a sessions and a SessionManager example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "Paris" in out and "GenerationStats(" in out
    exec(compile(blocks[1], str(README), "exec"), namespace)
    assert "Paris" in capsys.readouterr().out  # the restored context answers like the original
    assert (tmp_path / "assistant.session").is_file()
    exec(compile(blocks[2], str(README), "exec"), namespace)
    assert "Paris" in capsys.readouterr().out
    assert (tmp_path / "sessions" / "ada.session").is_file()
    restored, later = namespace["ctx"], namespace["later"]
    assert isinstance(restored, Context) and isinstance(later, Context)
    # The undo went back to the saved state.
    assert restored.tokens and restored.tokens == later.tokens[: len(restored.tokens)]
