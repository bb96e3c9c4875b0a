"""SessionManager hardening (issue 9): a turn owns its session until it ends, eviction never takes a session
mid-turn, changes made through a loaded Context are saved, a busy session answers at once or within the
caller's timeout, and no call waits for a lock with the GIL held. Real model, real files; greedy answers."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from llama_sessions import (
    Context,
    InvalidParameterError,
    Model,
    SessionBusyError,
    SessionError,
    SessionManager,
    SessionNotFoundError,
    inspect_session,
)
from manager_worker import N_BATCH, N_CTX, N_THREADS, open_manager

WORKER = pathlib.Path(__file__).with_name("manager_hardening_worker.py")
#: A scenario takes seconds; past this bound its process is taken to hang (a deadlock).
HANG_BOUND_SECONDS = 120
SYS = "You are a helpful assistant who answers in one sentence."
QUESTION = "Name a color."
#: Tokens generated per chat turn.
N = 8


def run_scenario(scenario: str, model_path: pathlib.Path, session_dir: pathlib.Path) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, str(WORKER), scenario, str(model_path), str(session_dir)],
            capture_output=True,
            text=True,
            timeout=HANG_BOUND_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"scenario {scenario!r} hung (still running after {HANG_BOUND_SECONDS} s): a deadlock")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def exchange(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# Defect 9: eviction and a turn in progress


def test_a_session_is_not_evicted_during_a_streamed_turn(model: Model, tmp_path: pathlib.Path) -> None:
    twin = open_manager(model, str(tmp_path / "twin"))
    twin.create_session("a", SYS)
    expected = twin.chat("a", QUESTION, N, temperature=0)
    assert expected

    m = open_manager(model, str(tmp_path / "m"), max_live=1)
    m.create_session("b", SYS)
    m.create_session("a", SYS)  # evicts "b"
    stream = m.stream_chat("a", QUESTION, N, temperature=0)
    pieces = [next(stream)]
    m.load("b")  # over max_live, but "a" is mid-turn: it stays
    assert m.live_sessions() == ["a", "b"]
    assert m.stats["evictions"] == 1
    pieces.extend(stream)
    assert "".join(pieces) == expected
    assert m.history("a") == exchange(QUESTION, expected)
    m.save("a")
    assert m.load("a").tokens == twin.load("a").tokens
    assert inspect_session(m.session_path("a")).sequences == {0: twin.load("a").tokens}
    assert open_manager(model, str(tmp_path / "m")).history("a") == exchange(QUESTION, expected)


# Defect 10: changes made through the Context that load() returned


def change_by_generate(ctx: Context, model: Model) -> None:
    ctx.generate(" Tell me more.", 4, temperature=0)


def change_by_truncate(ctx: Context, model: Model) -> None:
    ctx.truncate(ctx.token_count() - 3)


def change_by_restore(ctx: Context, model: Model) -> None:
    other = Context(model, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=N_THREADS)
    other.generate("Once upon a time", 0)
    ctx.restore(other.snapshot())


@pytest.mark.parametrize("change", [change_by_generate, change_by_truncate, change_by_restore])
def test_changes_made_through_the_loaded_context_are_saved_on_eviction(
    model: Model, tmp_path: pathlib.Path, change: Callable[[Context, Model], None]
) -> None:
    m = open_manager(model, str(tmp_path), max_live=1)
    m.create_session("a", SYS)
    assert m.chat("a", QUESTION, N, temperature=0)
    m.save("a")
    ctx = m.load("a")
    before = ctx.tokens
    change(ctx, model)
    changed = ctx.tokens
    assert changed != before
    saves = m.stats["store_saves"]
    m.create_session("b")  # evicts "a", which changed since its save
    assert m.live_sessions() == ["b"]
    assert m.stats["store_saves"] == saves + 2  # "a" on its way out, then "b"
    assert inspect_session(m.session_path("a")).sequences == {0: changed}
    assert m.load("a").tokens == changed


def test_an_unchanged_session_is_not_saved_on_eviction(model: Model, tmp_path: pathlib.Path) -> None:
    m = open_manager(model, str(tmp_path), max_live=1)
    m.create_session("a", SYS)
    ctx = m.load("a")
    assert ctx.tokens  # read, not changed
    before = m.session_path("a").read_bytes()
    saves = m.stats["store_saves"]
    m.create_session("b")
    assert m.live_sessions() == ["b"]
    assert m.stats["store_saves"] == saves + 1  # "b" only
    assert m.session_path("a").read_bytes() == before


# Defect 11: no lock awaited with the GIL held, no global lock held across I/O


def test_history_while_a_turn_runs_in_another_thread_does_not_deadlock(
    model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    result = run_scenario("history-during-turn", model_path, tmp_path)
    assert result["errors"] == []
    assert result["reads"] > 0
    assert set(result["history_lengths"]) <= {0, 2}
    assert result["final"] == 2


def test_live_sessions_and_repr_during_an_eviction_waiting_for_a_file_lock_do_not_deadlock(
    model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    result = run_scenario("live-set-during-eviction", model_path, tmp_path)
    assert result["errors"] == []
    assert result["seen"][-1] == ["a", "b"]
    assert result["repr"] == f'SessionManager(session_dir="{tmp_path}", max_live=1, live=2)'
    assert result["after"] == ["b"]
    assert result["stored_a"] == 2  # the evicted session's turn was saved once the lock was free


# Defect 13: a second turn on a busy session


def test_a_second_turn_with_timeout_zero_raises_session_busy_at_once(
    model: Model, tmp_path: pathlib.Path
) -> None:
    m = open_manager(model, str(tmp_path))
    m.create_session("x", SYS)
    stream = m.stream_chat("x", QUESTION, N, temperature=0)
    first = next(stream)
    with pytest.raises(SessionBusyError, match=r'session "x" is busy: a turn in progress holds it') as raised:
        m.stream_chat("x", "Name an animal.", N, temperature=0, timeout=0)
    assert isinstance(raised.value, SessionError)
    for call in (
        lambda: m.chat("x", "Name an animal.", N, temperature=0, timeout=0),
        lambda: m.generate_reusing_prefix("x", "Hello", N, temperature=0, timeout=0),
        lambda: m.revert("x", "any", timeout=0),
    ):
        with pytest.raises(SessionBusyError):
            call()
    # The open stream is untouched by the refused calls.
    answer = first + "".join(stream)
    assert answer
    assert m.history("x") == exchange(QUESTION, answer)
    assert m.chat("x", "Name an animal.", N, temperature=0, timeout=0)


def test_a_wait_for_a_busy_session_ends_with_session_busy_after_the_timeout(
    model: Model, tmp_path: pathlib.Path
) -> None:
    m = open_manager(model, str(tmp_path))
    m.create_session("x", SYS)
    stream = m.stream_chat("x", QUESTION, N, temperature=0)
    next(stream)
    with pytest.raises(SessionBusyError):
        m.stream_chat("x", "Name an animal.", N, temperature=0, timeout=0.2)
    del stream  # a dropped stream ends its turn (the answer does not join the history)
    assert m.history("x") == []
    assert m.stream_chat("x", "Name an animal.", N, temperature=0, timeout=0.2) is not None


def test_a_closed_stream_frees_the_session_at_once(model: Model, tmp_path: pathlib.Path) -> None:
    m = open_manager(model, str(tmp_path))
    m.create_session("x", SYS)
    stream = m.stream_chat("x", QUESTION, N, temperature=0)
    piece = next(stream)
    assert piece
    held = m.load("x").tokens
    stream.close()
    assert list(stream) == []
    stream.close()  # closing twice is harmless
    assert m.history("x") == []  # an unfinished turn does not join the history
    assert m.load("x").tokens == held  # what was generated stays in the context
    assert m.chat("x", "Name an animal.", N, temperature=0, timeout=0)
    assert [h["role"] for h in m.history("x")] == ["user", "assistant"]


def test_ctrl_c_ends_a_wait_for_a_busy_session(model_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    result = run_scenario("ctrl-c-while-waiting-for-a-turn", model_path, tmp_path)
    assert result["interrupted"] is True
    assert result["first"] and result["second"]
    assert result["roles"] == ["user", "assistant"] * 2


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_a_bad_timeout_is_rejected(model: Model, tmp_path: pathlib.Path, timeout: float) -> None:
    m = open_manager(model, str(tmp_path))
    m.create_session("x", SYS)
    with pytest.raises(InvalidParameterError, match=r"invalid timeout: expected a number of seconds >= 0"):
        m.chat("x", QUESTION, N, temperature=0, timeout=timeout)
    assert m.history("x") == []


# Defect 14: save() of a stored session that is not live


def test_saving_a_stored_session_that_is_not_live_is_a_no_op(model: Model, tmp_path: pathlib.Path) -> None:
    m = open_manager(model, str(tmp_path), max_live=1)
    m.create_session("a", SYS)
    m.chat("a", QUESTION, N, temperature=0)
    m.create_session("b", SYS)  # evicts "a", saving its turn
    assert m.live_sessions() == ["b"]
    assert m.exists("a")
    before = m.session_path("a").read_bytes()
    saves = m.stats["store_saves"]
    m.save("a")
    assert m.session_path("a").read_bytes() == before
    assert m.stats["store_saves"] == saves
    assert m.live_sessions() == ["b"]
    with pytest.raises(SessionNotFoundError, match=r'no session "never-created"'):
        m.save("never-created")
    fresh = SessionManager(model, tmp_path, n_ctx=N_CTX)
    fresh.save("a")  # nothing loaded in this manager either
    assert m.session_path("a").read_bytes() == before
