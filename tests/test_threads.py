"""Threads, the GIL and Ctrl-C."""

from __future__ import annotations

import _thread
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from llama_sessions import Context, Model

from conftest import SMALL, STORY, assert_same_output

LONG_PROMPT = "The lighthouse keeper counted the waves. " * 120  # about 1000 tokens


def run_story(model: Model, n: int, n_threads: int = 1) -> tuple[str, list[int]]:
    ctx = Context(model, **SMALL, n_threads=n_threads)  # type: ignore[arg-type]
    text = ctx.generate(STORY, max_tokens=n, temperature=0)
    return text, ctx.tokens


def assert_stories_in_threads_match_sequential_runs(model: Model, lengths: list[int], n_threads: int) -> None:
    """One context per length, each generating in its own thread at once, ends exactly as when they run one
    after the other."""
    sequential = [run_story(model, n, n_threads) for n in lengths]
    results: list[tuple[str, list[int]] | None] = [None] * len(lengths)

    def worker(i: int) -> None:
        results[i] = run_story(model, lengths[i], n_threads)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(lengths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(text for text, _ in sequential)
    assert results == sequential


def test_two_contexts_in_two_threads_match_sequential_runs(model: Model) -> None:
    assert_stories_in_threads_match_sequential_runs(model, [16, 16], n_threads=1)


def test_contexts_sharing_the_compute_thread_from_four_threads_match_sequential_runs(model: Model) -> None:
    # n_threads=2 on a machine of at most 2 cores: every decode of the four goes to the one compute lane,
    # interleaved token by token.
    assert_stories_in_threads_match_sequential_runs(model, [12, 13, 14, 15], n_threads=2)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX only")
def test_a_process_forked_after_decoding_decodes_too() -> None:
    # The child inherits the parent's compute lanes but not their threads: it must start its own rather than
    # wait for ever (a subprocess, so that a hang fails this test instead of the suite).
    script = textwrap.dedent(
        """
        import os
        from llama_sessions import Context, Model, default_model_path
        model = Model.load(default_model_path())
        def story():
            ctx = Context(model, n_ctx=256, n_threads=2)
            return ctx.generate("Once upon a time", max_tokens=6, temperature=0)
        print("parent", repr(story()), flush=True)
        pid = os.fork()
        if pid == 0:
            print("child", repr(story()), flush=True)
            os._exit(0)
        print("child exit", os.waitpid(pid, 0)[1], flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert len(lines) == 3, done.stdout
    parent, child, exit_line = lines
    assert parent.startswith("parent ") and parent != "parent ''"
    assert child == "child " + parent.removeprefix("parent ")
    assert exit_line == "child exit 0"


def test_the_gil_is_released_during_a_long_prefill(model: Model) -> None:
    ctx = Context(model, n_ctx=2048, n_batch=512)
    ticks = 0
    done = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    started = time.perf_counter()
    ctx.generate(LONG_PROMPT, max_tokens=0)
    elapsed = time.perf_counter() - started
    done.set()
    counter.join()
    assert elapsed > 0.5, "the prefill must be long enough for the check to mean something"
    # With the GIL held for the whole prefill the counter would not run at all.
    assert ticks > 50


def test_one_context_serves_one_call_at_a_time(model: Model) -> None:
    shared = Context(model, **SMALL)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(3):
                shared.generate("Hello there. ", max_tokens=2, temperature=0)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    # Nine calls of 4 prompt tokens (the first with the same count: no BOS for this model) + 2 generated.
    prompt_tokens = len(model.tokenize("Hello there. ", special=True))
    assert shared.token_count() == 9 * (prompt_tokens + 2)


def test_ctrl_c_interrupts_a_long_prefill_and_keeps_the_context_consistent(model: Model) -> None:
    ctx = Context(model, n_ctx=2048, n_batch=32)
    expected = model.tokenize(LONG_PROMPT, special=True)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        ctx.generate(LONG_PROMPT, max_tokens=0)
    timer.join()
    held = ctx.token_count()
    assert 0 < held < len(expected)
    assert held % 32 == 0
    assert ctx.tokens == expected[:held]
    # The cache behind the bookkeeping is right: continuing gives what an uninterrupted context gives.
    reference = Context(model, n_ctx=2048, n_batch=32)
    reference.generate(LONG_PROMPT, max_tokens=0)
    reference.truncate(held)
    assert_same_output(
        ctx.generate(STORY, max_tokens=6, temperature=0),
        reference.generate(STORY, max_tokens=6, temperature=0),
    )
    assert ctx.tokens == reference.tokens


def test_ctrl_c_interrupts_a_long_generation_and_keeps_what_was_generated(model: Model) -> None:
    ctx = Context(model, n_ctx=4096, n_batch=64)
    ctx.generate(STORY, max_tokens=0)
    prompt_tokens = ctx.token_count()
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        ctx.generate("", max_tokens=3000, temperature=0.7, seed=3)
    timer.join()
    held = ctx.token_count()
    assert prompt_tokens < held < 4096
    assert len(ctx.tokens) == held
    # Cache and bookkeeping agree: going back to the prompt and continuing greedily matches a fresh context.
    ctx.truncate(prompt_tokens)
    reference = Context(model, n_ctx=4096, n_batch=64)
    assert_same_output(
        ctx.generate("", max_tokens=6, temperature=0),
        reference.generate(STORY, max_tokens=6, temperature=0),
    )
    assert ctx.tokens == reference.tokens
