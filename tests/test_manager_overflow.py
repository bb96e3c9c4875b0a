"""SessionManager chat that keeps working: the overflow policy when a conversation outgrows n_ctx (256 here,
what llama.cpp allocates for small contexts), trim_history, durability by default (and the warnings when
autosave is off), and the stats of a manager's chat turn. Real model, real files; every answer is greedy."""

from __future__ import annotations

import asyncio
import gc
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest

from llama_sessions import (
    ContextFullError,
    InvalidParameterError,
    Model,
    SessionManager,
    UnsavedSessionsWarning,
)

SYS = "You are a storyteller."
STORY = "Tell me a long story about a dragon and a knight."
#: Room reserved for each answer after the first, long one.
ANSWER = 48


def small_manager(model: Model, directory: pathlib.Path, **options: object) -> SessionManager:
    return SessionManager(model, directory, n_ctx=256, n_batch=64, n_threads=1, **options)  # type: ignore[arg-type]


def chat(manager: SessionManager, message: str, max_tokens: int = ANSWER) -> str:
    return manager.chat("s", message, max_tokens, temperature=0)


def system_tokens(model: Model) -> list[int]:
    formatted = model.apply_chat_template([{"role": "system", "content": SYS}], add_generation_prompt=False)
    return model.tokenize(formatted, special=True)


def fill(manager: SessionManager) -> None:
    """A session whose first answer fills most of the context: the next turn cannot keep it all."""
    manager.create_session("s", SYS)
    assert chat(manager, STORY, 200)
    assert manager.load("s").last_stats is not None
    assert manager.load("s").token_count() > 256 - ANSWER


def snapshot(manager: SessionManager) -> tuple[list[dict[str, str]], list[int], bytes]:
    return manager.history("s"), manager.load("s").tokens, manager.session_path("s").read_bytes()


# Item 2: the overflow policy


def test_a_full_session_keeps_answering_by_dropping_the_oldest_turns(
    model: Model, tmp_path: pathlib.Path
) -> None:
    manager = small_manager(model, tmp_path)
    assert manager.overflow == "drop_oldest"
    fill(manager)
    for turn in range(3):
        before = manager.history("s")
        message = f"And then? Part {turn}."
        answer = chat(manager, message)
        assert answer
        stats = manager.load("s").last_stats
        assert stats is not None
        assert stats.stop_reason != "context_full"  # room for the answer was reserved
        dropped = stats.dropped_turns
        assert dropped >= (1 if turn == 0 else 0)
        assert repr(stats).endswith(f'stop_reason="{stats.stop_reason}", dropped_turns={dropped})')
        history = manager.history("s")
        assert history == [
            *before[2 * dropped :],
            {"role": "user", "content": message},
            {"role": "assistant", "content": answer},
        ]
        tokens = manager.load("s").tokens
        assert tokens[: len(system_tokens(model))] == system_tokens(model)
    # Saved as it went (autosave is the default): a restarted manager finds the trimmed history.
    history = manager.history("s")
    assert small_manager(model, tmp_path).history("s") == history


def test_a_streamed_turn_follows_the_same_policy(model: Model, tmp_path: pathlib.Path) -> None:
    manager = small_manager(model, tmp_path)
    fill(manager)
    answer = "".join(manager.stream_chat("s", "And then?", ANSWER, temperature=0))
    assert answer
    stats = manager.load("s").last_stats
    assert stats is not None and stats.dropped_turns == 1
    assert manager.history("s") == [
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": answer},
    ]


def test_the_error_policy_raises_before_changing_anything_and_trim_history_makes_room(
    model: Model, tmp_path: pathlib.Path
) -> None:
    manager = small_manager(model, tmp_path, overflow="error")
    assert manager.overflow == "error"
    fill(manager)
    before = snapshot(manager)
    held = len(before[1])
    with pytest.raises(ContextFullError, match=r"trim_history\(session_id, keep_last=N\)") as refused:
        chat(manager, "And then?")
    message = str(refused.value)
    assert f"max_tokens={ANSWER}" in message
    assert f"the session holds {held} tokens and nothing was changed" in message
    assert snapshot(manager) == before
    with pytest.raises(ContextFullError, match="trim_history"):
        manager.stream_chat("s", "And then?", ANSWER, temperature=0)
    assert snapshot(manager) == before
    with pytest.raises(InvalidParameterError, match="keep_last"):
        manager.trim_history("s", -1)
    assert snapshot(manager) == before
    assert manager.trim_history("s", 1) == 0  # one turn held: nothing to drop

    assert asyncio.run(manager.atrim_history("s", keep_last=0)) == 1
    assert manager.history("s") == []
    assert small_manager(model, tmp_path).history("s") == []  # saved (autosave)
    held_tokens = manager.load("s").tokens  # trimming leaves the context to the next turn
    assert held_tokens == before[1]
    answer = chat(manager, "And then?")
    assert answer
    stats = manager.load("s").last_stats
    assert stats is not None and stats.dropped_turns == 0
    # Only what followed the prefix shared with the context (the system prompt at least) was decoded.
    after = manager.load("s").tokens
    shared = next(i for i, (a, b) in enumerate(zip(held_tokens, after, strict=False)) if a != b)
    assert shared >= len(system_tokens(model))
    assert stats.prompt_tokens == len(after) - shared - stats.generated_tokens


def test_a_turn_that_cannot_fit_even_alone_is_refused_with_its_numbers(
    model: Model, tmp_path: pathlib.Path
) -> None:
    manager = small_manager(model, tmp_path)
    manager.create_session("s", SYS)
    before = snapshot(manager)
    with pytest.raises(ContextFullError, match="n_ctx=256") as refused:
        chat(manager, "Hi.", 250)
    message = str(refused.value)
    assert "max_tokens=250" in message
    assert "a smaller max_tokens, or a larger n_ctx" in message
    assert snapshot(manager) == before


def test_an_unknown_overflow_policy_is_refused_by_name(model: Model, tmp_path: pathlib.Path) -> None:
    expected = r'invalid overflow: expected "drop_oldest" or "error", found "truncate"'
    with pytest.raises(InvalidParameterError, match=expected):
        SessionManager(model, tmp_path, overflow="truncate")  # type: ignore[arg-type]


def test_prefix_reuse_that_cannot_fit_reports_what_the_session_holds(
    model: Model, tmp_path: pathlib.Path
) -> None:
    manager = small_manager(model, tmp_path)
    fill(manager)
    held = manager.load("s").token_count()
    with pytest.raises(ContextFullError, match=rf"\({held} held\)"):
        manager.generate_reusing_prefix("s", "word " * 400, 4, temperature=0)
    assert manager.load("s").token_count() == held


# Item 3: durable by default, and never a silent loss


def test_autosave_is_the_default(model: Model, tmp_path: pathlib.Path) -> None:
    manager = SessionManager(model, tmp_path, n_ctx=512)
    assert manager.autosave
    manager.create_session("s", SYS)
    assert chat(manager, "Name a color.", 4)
    assert manager.unsaved_sessions() == []
    assert SessionManager(model, tmp_path, n_ctx=512).history("s") == manager.history("s")


def test_a_manager_without_autosave_that_goes_with_unsaved_sessions_warns(
    model: Model, tmp_path: pathlib.Path
) -> None:
    manager = SessionManager(model, tmp_path, n_ctx=512, autosave=False)
    manager.create_session("s", SYS)
    manager.create_session("t", SYS)
    assert manager.unsaved_sessions() == []  # creation stores a session
    assert chat(manager, "Name a color.", 4)
    assert manager.unsaved_sessions() == ["s"]
    with pytest.warns(UnsavedSessionsWarning, match=r"unsaved changes in sessions \['s'\]: they are lost"):
        del manager
        gc.collect()


def test_a_manager_without_autosave_whose_sessions_are_saved_goes_quietly(
    model: Model, tmp_path: pathlib.Path
) -> None:
    manager = SessionManager(model, tmp_path, n_ctx=512, autosave=False)
    manager.create_session("s", SYS)
    assert chat(manager, "Name a color.", 4)
    manager.save("s")
    assert manager.unsaved_sessions() == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del manager
        gc.collect()
    assert [w for w in caught if issubclass(w.category, UnsavedSessionsWarning)] == []


def test_eviction_saves_an_unsaved_session_even_without_autosave(
    model: Model, tmp_path: pathlib.Path
) -> None:
    manager = SessionManager(model, tmp_path, n_ctx=512, autosave=False, max_live=1)
    manager.create_session("s", SYS)
    answer = chat(manager, "Name a color.", 4)
    manager.create_session("other")  # evicts "s", which is saved first
    assert manager.live_sessions() == ["other"]
    assert manager.unsaved_sessions() == []
    assert SessionManager(model, tmp_path, n_ctx=512).history("s")[-1] == {
        "role": "assistant",
        "content": answer,
    }


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    from llama_sessions import Model, SessionManager

    model = Model.load(sys.argv[1])
    manager = SessionManager(model, sys.argv[2], n_ctx=512, autosave=False)
    manager.create_session("s")
    manager.chat("s", "Name a color.", 2, temperature=0)
    if sys.argv[3] == "save":
        manager.save("s")
    """
)


@pytest.mark.parametrize("save", [False, True])
def test_unsaved_sessions_at_interpreter_exit_are_warned_about(
    model_path: pathlib.Path, tmp_path: pathlib.Path, save: bool
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(model_path), str(tmp_path), "save" if save else "keep"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    warned = "UnsavedSessionsWarning: SessionManager(" in done.stderr
    assert warned != save, done.stderr
    if not save:
        assert "as the interpreter exits with unsaved changes in sessions ['s']" in done.stderr


# Item 4: why a turn stopped


def test_a_manager_chat_exposes_its_stats(model: Model, tmp_path: pathlib.Path) -> None:
    manager = SessionManager(model, tmp_path, n_ctx=512, n_batch=64)
    manager.create_session("s", SYS)
    held = manager.load("s").token_count()
    # A new session's stats are its system prompt's encoding.
    created = manager.load("s").last_stats
    assert created is not None
    assert (created.prompt_tokens, created.context_tokens, created.generated_tokens) == (held, held, 0)
    chat(manager, "Name a color.", 3)
    stats = manager.load("s").last_stats
    assert stats is not None
    assert (stats.stop_reason, stats.generated_tokens, stats.dropped_turns) == ("length", 3, 0)
    # Everything after the system prompt was decoded (prompt) or generated, and it all stays in the context.
    after = manager.load("s").token_count()
    assert stats.prompt_tokens + stats.generated_tokens == after - held
    assert stats.prompt_tokens > 0 and stats.prompt_seconds > 0 and stats.generation_seconds > 0

    # An answer the model ends itself: "eog", its end token counted and kept.
    held = manager.load("s").token_count()
    answer = asyncio.run(manager.achat("s", "Say only: yes.", 64, temperature=0))
    stats = manager.load("s").last_stats
    assert stats is not None and stats.stop_reason == "eog"
    tokens = manager.load("s").tokens
    assert model.detokenize(tokens[-1:], special=True) == "<|im_end|>"
    assert model.detokenize(tokens[-stats.generated_tokens : -1]) == answer

    # A stop string, streamed: the stats arrive when the stream ends.
    manager.create_session("t", SYS)
    question = "List the numbers one to ten, separated by commas."
    pieces = list(manager.stream_chat("t", question, 24, temperature=0, stop="3"))
    stats = manager.load("t").last_stats
    assert stats is not None and stats.stop_reason == "stop"
    assert pieces and "3" not in "".join(pieces)
    assert manager.history("t")[-1]["content"] == "".join(pieces)
    # Stats describe a live turn: a session read from its file has none until its next turn.
    assert SessionManager(model, tmp_path, n_ctx=512, n_batch=64).load("s").last_stats is None
