"""The README's examples run as written, in order (by the rule of tests/doc_examples.py), and print what they
promise."""

from __future__ import annotations

import pathlib

import pytest

from doc_examples import ROOT, DocumentRun
from llama_sessions import Context, Model


def test_quick_start_and_sessions_run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
    model_path: pathlib.Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    run = DocumentRun(ROOT / "README.md", model_path)
    assert [b.language for b in run.blocks].count("python") == 3, "quick start, sessions, SessionManager"
    run.run_through_python(1)
    # Before it: the install line's `llama-sessions demo` (the install itself is skipped).
    [demo] = run.commands
    assert demo.args[2] == "llama-sessions demo" and "\nrestore   " in demo.stdout
    out = capsys.readouterr().out
    # The answer after the system prompt, as a context of its own gives it (greedy: the same tokens).
    namespace = run.namespace
    model, system, question = namespace["model"], namespace["system"], namespace["question"]
    assert isinstance(model, Model) and isinstance(system, str) and isinstance(question, str)
    reference = Context(model, n_ctx=4096)
    reference.generate(system, max_tokens=0)
    answer = reference.generate(question, max_tokens=32, temperature=0)
    assert answer.strip() and out.startswith(answer + "\n") and "GenerationStats(" in out
    run.run_through_python(2)
    # The restored context answers exactly like the original.
    assert capsys.readouterr().out == answer + "\n"
    assert (tmp_path / "assistant.session").is_file()
    run.run_through_python(3)
    # The manager's session answers as Context.chat() does with the same two messages.
    messages = namespace["messages"]
    assert isinstance(messages, list)
    expected = Context(model, n_ctx=2048).chat(messages, max_tokens=32, temperature=0)
    assert expected.strip() and capsys.readouterr().out == expected + "\n"
    assert (tmp_path / "sessions" / "ada.session").is_file()
    restored, later = namespace["ctx"], namespace["later"]
    assert isinstance(restored, Context) and isinstance(later, Context)
    # The undo went back to the saved state.
    assert restored.tokens and restored.tokens == later.tokens[: len(restored.tokens)]
    run.run_rest()
    assert len(run.commands) == 1 and run.skipped  # the rest installs, tests and builds
