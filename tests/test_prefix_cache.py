"""The prefix cache from Python: contexts that share a PrefixCache restore each other's KV chunks and decode
only the rest, and so do the sessions of a SessionManager given one; chunks of other KV parameters or another
namespace never match; damaged chunk files are misses; bad arguments get exact exception types;
``llama-sessions cache`` reports, collects and clears."""

from __future__ import annotations

import pathlib

import pytest

from llama_sessions import (
    Context,
    InvalidParameterError,
    Model,
    PrefixCache,
    SessionManager,
    StorageError,
)
from llama_sessions.cli import main

from conftest import assert_same_output

C = 32
SMALL = {"n_ctx": 512, "n_batch": 64, "n_threads": 2}


def text(lines: int, shared: int, variant: str) -> str:
    """``lines`` lines, the first ``shared`` the same whatever ``variant`` is."""
    return "".join(
        f"Line {i}: the keeper lit lamp number {i} at dusk.\n"
        if i < shared
        else f"Line {i}: {variant} watched ship {i} pass the rocks.\n"
        for i in range(lines)
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompt_tokens(ctx: Context) -> int:
    stats = ctx.last_stats
    assert stats is not None
    return stats.prompt_tokens


def test_a_second_context_decodes_only_what_the_cache_lacks(model: Model, tmp_path: pathlib.Path) -> None:
    cache = PrefixCache(tmp_path / "cache", chunk_tokens=C)
    first, second = text(9, 6, "the first keeper"), text(9, 6, "a stranger")
    first_tokens, second_tokens = model.tokenize(first), model.tokenize(second)
    shared = common_prefix(first_tokens, second_tokens)
    assert 2 * C <= shared < 3 * C

    a = Context(model, **SMALL, prefix_cache=cache)
    answer = a.generate(first, 4, temperature=0.0)
    assert answer != ""
    assert prompt_tokens(a) == len(first_tokens)
    assert cache.stats()["entries"] == len(first_tokens) // C
    assert len(list((tmp_path / "cache").glob("*.kvchunk"))) == len(first_tokens) // C

    b = Context(model, **SMALL, prefix_cache=cache)
    assert b.generate(second, 4, temperature=0.0) != ""
    assert prompt_tokens(b) == len(second_tokens) - 2 * C
    assert b.tokens[: len(second_tokens)] == second_tokens
    assert cache.stats()["hits"] == 2


def chat_tokens(model: Model, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """The tokens a manager's context holds for ``messages`` (plain text: no markup inside)."""
    formatted = model.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return model.tokenize(formatted, special=True)


def test_manager_sessions_reuse_each_others_chunks(model: Model, tmp_path: pathlib.Path) -> None:
    system = text(8, 8, "")
    question = (
        "Tell me which lamps the keeper lit at dusk, and in which order he lit them, one by one, please."
    )
    system_tokens = chat_tokens(model, [{"role": "system", "content": system}], False)
    prompt = chat_tokens(
        model, [{"role": "system", "content": system}, {"role": "user", "content": question}], True
    )
    assert len(system_tokens) >= 100 and prompt[: len(system_tokens)] == system_tokens
    restorable = (len(prompt) - 1) // C * C  # full chunks, leaving the last token to decode for its logits
    assert restorable > len(system_tokens)

    cache = PrefixCache(chunk_tokens=C)
    # Sessions stored as files: the cache in memory serves prompts only (chunked storage is tested in
    # test_chunked_sessions.py).
    cached = SessionManager(model, tmp_path / "cached", **SMALL, prefix_cache=cache, storage="files")
    plain = SessionManager(model, tmp_path / "plain", **SMALL, storage="files")
    assert cached.prefix_cache is cache and plain.prefix_cache is None

    cached.create_session("a", system)
    assert cache.stats()["entries"] == len(system_tokens) // C  # the system prompt's full chunks, offered
    first = cached.chat("a", question, 6, temperature=0.0)
    assert prompt_tokens(cached.load("a")) == len(prompt) - len(system_tokens)
    assert cache.stats()["entries"] == len(prompt) // C

    # The second session restores the system prompt whole (the manager's copy), then the chunks the first
    # one computed for the same question: only the rest is decoded.
    cached.create_session("b", system)
    assert cached.stats["prefill_tokens"] == len(system_tokens)
    assert cached.stats["prefix_reuses"] == 1
    second = cached.chat("b", question, 6, temperature=0.0)
    assert prompt_tokens(cached.load("b")) == len(prompt) - restorable
    assert cached.load("b").tokens[: len(prompt)] == prompt

    # Answers as a manager without the cache gives them, where each session decodes the question itself.
    plain.create_session("a", system)
    plain.create_session("b", system)
    expected = plain.chat("b", question, 6, temperature=0.0)
    assert prompt_tokens(plain.load("b")) == len(prompt) - len(system_tokens)
    assert_same_output(second, expected)
    assert_same_output(first, plain.chat("a", question, 6, temperature=0.0))
    assert cached.load("b").tokens == plain.load("b").tokens


def test_damaged_chunk_files_are_misses_and_the_answer_is_unchanged(
    model: Model, tmp_path: pathlib.Path
) -> None:
    prompt = text(9, 9, "")
    n = len(model.tokenize(prompt))
    for damage in ("flip", "truncate"):
        directory = tmp_path / damage
        a = Context(model, **SMALL, prefix_cache=PrefixCache(directory, chunk_tokens=C))
        expected = a.generate(prompt, 8, temperature=0.0)
        files = sorted(directory.glob("*.kvchunk"))
        assert len(files) == n // C
        for path in files:
            data = bytearray(path.read_bytes())
            if damage == "flip":
                data[len(data) // 2] ^= 1
            else:
                del data[-1]
            path.write_bytes(bytes(data))
        cache = PrefixCache(directory, chunk_tokens=C)
        b = Context(model, **SMALL, prefix_cache=cache)
        assert_same_output(b.generate(prompt, 8, temperature=0.0), expected)
        assert prompt_tokens(b) == n
        # The first chunk of the chain failed its checks, was removed and written again soundly; gc finds
        # the other damaged files.
        assert cache.stats()["corrupt"] == 1
        report = cache.gc()
        assert (report["removed_corrupt"], report["evicted"], report["kept"]) == (len(files) - 1, 0, 1)


def test_chunks_of_other_kv_types_or_another_namespace_never_match(
    model: Model, tmp_path: pathlib.Path
) -> None:
    directory = tmp_path / "cache"
    prompt = text(9, 9, "")
    n = len(model.tokenize(prompt))
    Context(model, **SMALL, prefix_cache=PrefixCache(directory, chunk_tokens=C)).generate(prompt, 0)
    others = [
        Context(
            model,
            **SMALL,
            type_k="q8_0",
            type_v="q8_0",
            flash_attn=True,
            prefix_cache=PrefixCache(directory, chunk_tokens=C),
        ),
        Context(model, **SMALL, flash_attn=True, prefix_cache=PrefixCache(directory, chunk_tokens=C)),
        Context(model, **SMALL, prefix_cache=PrefixCache(directory, chunk_tokens=C, namespace="tenant b")),
        Context(model, **SMALL, prefix_cache=PrefixCache(directory, chunk_tokens=2 * C)),
    ]
    for ctx in others:
        ctx.generate(prompt, 0)
        assert prompt_tokens(ctx) == n
    # And the same parameters again do match.
    same = Context(model, **SMALL, prefix_cache=PrefixCache(directory, chunk_tokens=C))
    same.generate(prompt, 0)
    assert prompt_tokens(same) == n - n // C * C


def test_prefix_cache_arguments(model: Model, tmp_path: pathlib.Path) -> None:
    memory = PrefixCache(max_bytes=1 << 20, chunk_tokens=16, namespace="a")
    assert (memory.path, memory.chunk_tokens, memory.namespace, memory.max_bytes) == (None, 16, "a", 1 << 20)
    assert repr(memory) == 'PrefixCache(in memory, chunk_tokens=16, namespace="a")'
    assert memory.stats() == {
        "entries": 0,
        "bytes": 0,
        "max_bytes": 1 << 20,
        "hits": 0,
        "misses": 0,
        "corrupt": 0,
        "puts": 0,
        "evictions": 0,
    }
    disk = PrefixCache(tmp_path / "c")
    assert disk.path == tmp_path / "c" and disk.chunk_tokens == 256 and disk.namespace == ""
    for kwargs, message in [
        ({"chunk_tokens": 0}, "invalid chunk_tokens: expected 1 <= chunk_tokens <= 65536, found 0"),
        ({"chunk_tokens": -3}, "invalid chunk_tokens: expected 1 <= chunk_tokens <= 65536, found -3"),
        ({"max_bytes": 0}, "invalid max_bytes: expected max_bytes >= 1, found 0"),
        ({"namespace": "x" * 1025}, "invalid namespace: expected at most 1024 bytes, found 1025 bytes"),
    ]:
        with pytest.raises(InvalidParameterError) as excinfo:
            PrefixCache(**kwargs)  # type: ignore[arg-type]
        assert str(excinfo.value) == message
    with pytest.raises(TypeError, match="chunk_tokens"):
        PrefixCache(chunk_tokens="32")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prefix_cache"):
        Context(model, **SMALL, prefix_cache=str(tmp_path))  # type: ignore[arg-type]
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    with pytest.raises(StorageError):
        PrefixCache(a_file)


def test_cache_cli_reports_collects_and_clears(
    model: Model, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "cache"
    prompt = text(9, 9, "")
    chunks = len(model.tokenize(prompt)) // C
    Context(model, **SMALL, prefix_cache=PrefixCache(directory, chunk_tokens=C)).generate(prompt, 0)
    size = sum(p.stat().st_size for p in directory.glob("*.kvchunk"))
    assert main(["cache", "stats", "--dir", str(directory)]) == 0
    assert capsys.readouterr().out == f"{directory}: {chunks} chunks, {size:,} bytes\n"
    victim = next(directory.glob("*.kvchunk"))
    victim.write_bytes(victim.read_bytes()[:-1])
    assert main(["cache", "gc", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{directory}: removed 1 corrupt chunks, evicted 0, kept {chunks - 1} (")
    assert not victim.exists()
    assert main(["cache", "gc", "--dir", str(directory), "--max-bytes", "1"]) == 0
    assert (
        capsys.readouterr().out
        == f"{directory}: removed 0 corrupt chunks, evicted {chunks - 1}, kept 0 (0 bytes)\n"
    )
    Context(model, **SMALL, prefix_cache=PrefixCache(directory, chunk_tokens=C)).generate(prompt, 0)
    assert main(["cache", "clear", "--dir", str(directory)]) == 0
    assert capsys.readouterr().out == f"{directory}: removed {chunks} chunks\n"
    assert list(directory.glob("*.kvchunk")) == []
    assert main(["cache", "stats", "--dir", str(tmp_path / "missing")]) == 1
    assert "no prefix cache directory" in capsys.readouterr().err
