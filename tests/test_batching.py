"""SessionManager(batching=True): the live sessions are sequences of one context, decoded together."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from llama_sessions import ContextFullError, InvalidParameterError, KvBudgetFullError, Model, SessionManager
from test_sessions import state_of

SYSTEM = "You are a helpful assistant who answers in full sentences."
QUESTIONS = [
    "Tell me about lighthouses.",
    "What is bread made of?",
    "Describe a busy market.",
    "How does a steam engine work?",
]


def manager(model: Model, path: Path, **kwargs: object) -> SessionManager:
    options: dict[str, object] = {"n_ctx": 1024, "n_batch": 128, "max_live": 4}
    options.update(kwargs)
    return SessionManager(model, path, **options)  # type: ignore[arg-type]


def test_concurrent_chats_are_decoded_together_and_stored_as_without_batching(
    model: Model, tmp_path: Path
) -> None:
    batched = manager(model, tmp_path, batching=True)
    assert batched.batching
    for i in range(4):
        batched.create_session(f"user-{i}", SYSTEM)
    answers: dict[int, str] = {}

    def chat(i: int) -> None:
        answers[i] = batched.chat(f"user-{i}", QUESTIONS[i], max_tokens=24, temperature=0.0)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [0, 1, 2, 3]
    assert all(answers.values())
    stats = batched.stats
    assert stats["max_sessions_in_step"] >= 2, stats
    assert stats["prefill_tokens"] > 0 and stats["prefix_reuses"] == 3

    # What each session holds is its conversation: the stored history and the context's tokens agree.
    for i in range(4):
        history = batched.history(f"user-{i}")
        assert history == [
            {"role": "user", "content": QUESTIONS[i]},
            {"role": "assistant", "content": answers[i]},
        ]
    # The files are those of a manager without batching: it loads them and continues exactly as the batching
    # manager does for a turn alone (a solo turn in the pool is computed as in a context of its own).
    tokens = [batched.load(f"user-{i}").tokens for i in range(4)]
    batched.checkpoint("user-0", "before")
    solo_batched = batched.chat("user-0", "And then?", max_tokens=16, temperature=0.0)
    batched.revert("user-0", "before")
    plain = manager(model, tmp_path)
    assert not plain.batching
    assert [plain.load(f"user-{i}").tokens for i in range(4)] == tokens
    assert plain.chat("user-0", "And then?", max_tokens=16, temperature=0.0) == solo_batched != ""
    assert plain.stats["batch_steps"] == 0 and plain.stats["max_sessions_in_step"] == 0


def test_a_solo_turn_equals_a_manager_without_batching(model: Model, tmp_path: Path) -> None:
    batched = manager(model, tmp_path / "a", batching=True)
    plain = manager(model, tmp_path / "b")
    for m in (batched, plain):
        m.create_session("s", SYSTEM)
    for question in QUESTIONS[:2]:
        a = batched.chat("s", question, max_tokens=20, temperature=0.0)
        b = plain.chat("s", question, max_tokens=20, temperature=0.0)
        assert a and a == b
    assert batched.load("s").tokens == plain.load("s").tokens


def test_eviction_frees_sequences_and_a_held_context_keeps_working(model: Model, tmp_path: Path) -> None:
    m = manager(model, tmp_path, max_live=2, batching=True)
    held = m.create_session("a", SYSTEM)
    m.create_session("b", SYSTEM)
    m.chat("a", "Hello!", max_tokens=8, temperature=0.0)
    # A third session: "b" is evicted (idle, least recently used); "a" is held by this test, so its sequence
    # stays taken, and a context of its own serves "c" if no sequence is free.
    m.create_session("c", SYSTEM)
    m.chat("c", "Hi there!", max_tokens=8, temperature=0.0)
    assert set(m.live_sessions()) <= {"a", "b", "c"}
    assert len(m.live_sessions()) <= 2
    before = held.tokens
    assert len(before) > 0
    # Every session still answers, loading from its file where it was evicted.
    for sid in ("a", "b", "c"):
        assert m.chat(sid, "One more thing.", max_tokens=6, temperature=0.0)
    assert m.stats["evictions"] >= 2


def test_batching_needs_a_batch_that_holds_every_session(model: Model, tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="n_batch >= max_live"):
        manager(model, tmp_path, n_batch=2, max_live=4, batching=True)


LONG_SYSTEM = SYSTEM + "\n" + "\n".join(f"Rule {i}: answer clearly and stay polite." for i in range(22))


def test_shared_kv_cells_are_all_the_sessions_allocate_and_idle_sessions_make_room(
    model: Model, tmp_path: Path
) -> None:
    shared = manager(model, tmp_path / "shared", max_live=3, n_ctx=512, batching=True, kv_cells=600)
    assert shared.kv_cells == 768  # rounded up to a multiple of 256, as llama.cpp allocates
    per_session = manager(model, tmp_path / "streams", max_live=3, n_ctx=512, batching=True)
    assert per_session.kv_cells is None
    # The same cells cost the same bytes: 768 shared against 3 x 512.
    assert shared.live_kv_bytes() * 2 == per_session.live_kv_bytes()

    for sid in ("a", "b"):
        shared.create_session(sid, LONG_SYSTEM)
        shared.chat(sid, QUESTIONS[0], max_tokens=16, temperature=0.0)
    held = len(shared.load("b").tokens)  # ("b" is now the most recently used)
    assert 2 * held <= 768 < 3 * held, held
    assert shared.stats["evictions"] == 0
    # A third session needs the cells of the least recently used idle one: "a" is saved and evicted.
    shared.create_session("c", LONG_SYSTEM)
    assert shared.live_sessions() == ["b", "c"]
    assert shared.stats["evictions"] == 1
    # It comes back from its file as it was, and continues as a manager without batching does (on a copy
    # of the files, so that neither manager sees the other's turn).
    shutil.copytree(tmp_path / "shared", tmp_path / "copy")
    plain = manager(model, tmp_path / "copy", n_ctx=512)
    assert plain.load("a").tokens == shared.load("a").tokens
    assert shared.chat("a", "And then?", max_tokens=8, temperature=0.0) == plain.chat(
        "a", "And then?", max_tokens=8, temperature=0.0
    )

    # Sessions in turns are never evicted: with two turns open, a new session does not fit (a ContextFullError
    # of its own kind: the server answers it 503, not 400).
    assert issubclass(KvBudgetFullError, ContextFullError)
    streams = [shared.stream_chat(sid, "Go on.", max_tokens=16, temperature=0.0) for sid in ("b", "c")]
    with pytest.raises(KvBudgetFullError, match=r"^the shared KV cache is full: \d+ more cells needed"):
        shared.create_session("d", LONG_SYSTEM)
    assert not shared.exists("d")
    for stream in streams:
        assert "".join(stream)
    shared.create_session("d", LONG_SYSTEM)
    assert "d" in shared.live_sessions()


def test_in_a_shared_cache_another_sessions_words_never_reach_a_session(model: Model, tmp_path: Path) -> None:
    """kv_cells: the sessions share one KV cache, and yet what one reads never reaches another's numbers.
    With the same cells in use (a neighbour whose prompt is as long, in other words), a session's answer and
    state are the same bit for bit (docs/manager.md, "Isolation")."""
    # Two neighbours of 6 tokens, and one of 8: two cells more put the session's cells in other SIMD lanes,
    # which moves its numbers (the control: the comparison below can see a difference).
    neighbours = [
        "You only talk about apples.",
        "You only talk about pears.",
        "You only talk about apples and pears.",
    ]
    assert [len(model.tokenize(text)) for text in neighbours] == [6, 6, 8]
    answers, states = [], []
    for i, neighbour in enumerate(neighbours):
        shared = manager(model, tmp_path / str(i), max_live=2, n_ctx=512, batching=True, kv_cells=1024)
        shared.create_session("neighbour", neighbour)
        shared.create_session("me", SYSTEM)
        answers.append(shared.chat("me", QUESTIONS[0], max_tokens=24, temperature=0.0))
        states.append(state_of(shared.load("me").snapshot()))  # llama.cpp's bytes (the header has a time)
    assert answers[0] and answers[0] == answers[1]
    assert states[0] == states[1]
    assert states[2] != states[0]


def test_kv_cells_are_checked(model: Model, tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError) as without:
        manager(model, tmp_path, kv_cells=600)
    assert str(without.value) == (
        "invalid kv_cells: expected None without batching=True (the cells shared by a batching manager's "
        "sessions), found 600"
    )
    for cells in (0, 4 * 1024 + 1):
        with pytest.raises(InvalidParameterError) as wrong:
            manager(model, tmp_path, batching=True, kv_cells=cells)
        assert str(wrong.value) == (
            "invalid kv_cells: expected 1 <= kv_cells <= max_live * n_ctx = 4096 (more cells than every "
            f"sequence can hold would never be used), found {cells}"
        )
    with pytest.raises(InvalidParameterError, match="0 < kv_cells < 2"):
        manager(model, tmp_path, batching=True, kv_cells=-1)
    with pytest.raises(TypeError):
        manager(model, tmp_path, batching=True, kv_cells="600")


def test_a_turn_larger_than_all_shared_cells_is_refused_before_it_starts(
    model: Model, tmp_path: Path
) -> None:
    small = manager(model, tmp_path, n_ctx=512, max_live=2, batching=True, kv_cells=256)
    small.create_session("a", "You are terse.")
    held = small.load("a").tokens
    # It fits a session's n_ctx (512), not the 256 cells all sessions share.
    with pytest.raises(
        KvBudgetFullError,
        match=r"^the shared KV cache is too small: this call needs \d+ cells .* kv_cells=256 in all; raise",
    ):
        small.chat("a", "Tell me a long story.", max_tokens=400)
    assert small.history("a") == [] and small.load("a").tokens == held
