"""What the size parameters mean: n_ctx is the KV cells of the whole context, shared by its sequences, as
llama.cpp allocated them; sessions record and compare those allocated sizes, also for files that recorded the
requested ones."""

from __future__ import annotations

import json
import pathlib

import pytest

from llama_sessions import (
    Context,
    ContextFullError,
    ContextParams,
    Model,
    SessionParamsMismatchError,
    inspect_session,
)
from test_sessions import PRELUDE_LEN, forge, header_of, layout, state_of

from conftest import STORY, SYSTEM, assert_same_output


def greedy(ctx: Context, prompt: str, n: int, seq: int = 0) -> str:
    return ctx.generate(prompt, max_tokens=n, temperature=0, seq=seq)


def words(model: Model, n: int) -> str:
    """A prompt of exactly ``n`` tokens after a non-empty context (no BOS)."""
    text = " lighthouse" * n
    assert len(model.tokenize(text, add_bos=False, special=True)) == n
    return text


def test_n_ctx_is_shared_by_the_sequences(model: Model) -> None:
    ctx = Context(model, n_ctx=1024, n_batch=64, n_seq_max=2)
    assert (ctx.n_ctx, ctx.n_ctx_per_seq, ctx.n_seq_max) == (1024, 512, 2)
    assert ctx.params.n_ctx == 1024
    assert repr(ctx) == "Context(tokens=0 in sequence 0, n_ctx=1024, n_seq_max=2)"
    greedy(ctx, SYSTEM, 0, seq=1)
    held = ctx.token_count(1)
    greedy(ctx, words(model, 512 - held), 0, seq=1)  # sequence 1 takes its whole share
    assert ctx.token_count(1) == 512
    with pytest.raises(ContextFullError) as excinfo:
        greedy(ctx, " lighthouse", 0, seq=1)
    assert str(excinfo.value) == (
        "context full: 1 more tokens requested but only 0 of n_ctx_per_seq=512 (n_ctx=1024 cells shared by "
        "n_seq_max=2 sequences) are free (512 held)"
    )
    # Sequence 0 still has its own share, all of it.
    greedy(ctx, SYSTEM, 0)
    first = ctx.token_count()
    with pytest.raises(ContextFullError, match=rf"only {512 - first} of n_ctx_per_seq=512 \("):
        greedy(ctx, words(model, 513 - first), 0)
    greedy(ctx, words(model, 512 - first), 0)
    assert (ctx.token_count(0), ctx.token_count(1)) == (512, 512)


def test_one_sequence_holds_all_of_n_ctx(model: Model) -> None:
    ctx = Context(model, n_ctx=256, n_batch=64)
    assert (ctx.n_ctx, ctx.n_ctx_per_seq) == (256, 256)
    assert repr(ctx) == "Context(tokens=0, n_ctx=256)"
    greedy(ctx, SYSTEM, 0)
    held = ctx.token_count()
    with pytest.raises(ContextFullError) as excinfo:
        greedy(ctx, words(model, 300), 0)
    assert str(excinfo.value) == (
        f"context full: 300 more tokens requested but only {256 - held} of n_ctx=256 are free ({held} held)"
    )


@pytest.mark.parametrize(
    ("requested", "allocated"),
    [
        ({"n_ctx": 300}, {"n_ctx": 512, "n_batch": 300, "n_ctx_per_seq": 512}),
        ({"n_ctx": 300, "n_batch": 64}, {"n_ctx": 512, "n_batch": 64, "n_ctx_per_seq": 512}),
        ({"n_ctx": 1000, "n_seq_max": 2}, {"n_ctx": 1024, "n_batch": 512, "n_ctx_per_seq": 512}),
        # Each sequence gets a multiple of 256: four sequences of n_ctx=512 get 256 each, 1024 in all.
        ({"n_ctx": 512, "n_batch": 64, "n_seq_max": 4}, {"n_ctx": 1024, "n_batch": 64, "n_ctx_per_seq": 256}),
    ],
)
def test_params_hold_what_llama_cpp_allocated(
    model: Model, requested: dict[str, int], allocated: dict[str, int]
) -> None:
    asked = ContextParams(**requested)  # type: ignore[arg-type]
    assert asked.n_ctx == requested["n_ctx"]  # a ContextParams is what was asked for
    ctx = Context(model, asked)
    assert ctx.params == asked.replace(n_ctx=allocated["n_ctx"], n_batch=allocated["n_batch"])
    assert (ctx.n_ctx, ctx.n_ctx_per_seq) == (allocated["n_ctx"], allocated["n_ctx_per_seq"])
    header = header_of(ctx.snapshot(seq=0))
    assert header["params"] == {
        "n_ctx": allocated["n_ctx"],
        "n_batch": allocated["n_batch"],
        "type_k": "f16",
        "type_v": "f16",
        "flash_attn": False,
        "n_seq_max": asked.n_seq_max,
    }


def test_a_session_of_n_ctx_300_loads_where_512_cells_are(model: Model, tmp_path: pathlib.Path) -> None:
    small = Context(model, n_ctx=300, n_batch=64)
    greedy(small, SYSTEM, 4)
    path = tmp_path / "300.session"
    small.save_session(path)
    info = inspect_session(path)
    assert info.params is not None and (info.params.n_ctx, info.params.n_batch) == (512, 64)

    wide = Context(model, n_ctx=512, n_batch=64)
    wide.load_session(path)
    assert wide.tokens == small.tokens
    assert_same_output(greedy(wide, STORY, 8), greedy(small, STORY, 8))
    assert wide.tokens == small.tokens
    # And back: a session of n_ctx=512 loads into n_ctx=300.
    again = Context(model, n_ctx=300, n_batch=64)
    again.restore(wide.snapshot())
    assert again.tokens == wide.tokens


def test_a_clamped_n_batch_compares_as_clamped(model: Model) -> None:
    # n_ctx=300 clamps the default n_batch=512 to 300; asking for 300 is the same context.
    clamped = Context(model, n_ctx=300)
    greedy(clamped, SYSTEM, 0)
    same = Context(model, n_ctx=512, n_batch=300)
    same.restore(clamped.snapshot())
    assert same.tokens == clamped.tokens
    # A context that batches by 512 is another one, and the error says so with the allocated values.
    with pytest.raises(SessionParamsMismatchError) as excinfo:
        Context(model, n_ctx=512).restore(clamped.snapshot())
    assert excinfo.value.mismatches == {"n_batch": (300, 512)}
    assert "n_batch saved 300, current 512" in str(excinfo.value)


def with_recorded_params(data: bytes, **params: int) -> bytes:
    """``data`` as an earlier version would have written it: the header records ``params`` instead."""
    header = header_of(data)
    assert isinstance(header["params"], dict)
    header["params"].update(params)
    text = json.dumps(header, separators=(",", ":")).encode()
    return forge(1, text, state_of(data))


def test_files_that_recorded_the_requested_size_compare_as_allocated(
    model: Model, tmp_path: pathlib.Path
) -> None:
    source = Context(model, n_ctx=512, n_batch=64)
    greedy(source, SYSTEM, 4)
    old = with_recorded_params(source.snapshot(), n_ctx=300)
    header_len, _ = layout(old)
    assert json.loads(old[PRELUDE_LEN : PRELUDE_LEN + header_len])["params"]["n_ctx"] == 300
    for current in ({"n_ctx": 512, "n_batch": 64}, {"n_ctx": 300, "n_batch": 64}):
        ctx = Context(model, **current)  # type: ignore[arg-type]
        ctx.restore(old)
        assert ctx.tokens == source.tokens
    path = tmp_path / "old.session"
    path.write_bytes(old)
    created = Context.from_session(model, path)
    assert (created.n_ctx, created.params.n_batch) == (512, 64)
    assert_same_output(greedy(created, STORY, 8), greedy(source, STORY, 8))
    # The requested n_batch=512 of an n_ctx=300 context was applied as 300.
    requested = with_recorded_params(
        Context(model, n_ctx=512, n_batch=300).snapshot(), n_ctx=300, n_batch=512
    )
    Context(model, n_ctx=300).restore(requested)
    # A real difference is reported with the saved value as allocated.
    with pytest.raises(SessionParamsMismatchError) as excinfo:
        Context(model, n_ctx=1024, n_batch=64).restore(old)
    assert excinfo.value.mismatches == {"n_ctx": (512, 1024)}
