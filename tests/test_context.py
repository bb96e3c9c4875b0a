"""Context: generation, bookkeeping, overflow, parameters."""

from __future__ import annotations

import pytest

from llama_sessions import (
    Context,
    ContextFullError,
    ContextParams,
    InvalidParameterError,
    Model,
    StreamInvalidatedError,
    TokenizeError,
)

from conftest import SMALL, STORY, SYSTEM, assert_same_output


def greedy(ctx: Context, prompt: str, n: int) -> str:
    text = ctx.generate(prompt, max_tokens=n, temperature=0)
    assert ctx.token_count() == len(ctx.tokens)
    return text


def test_greedy_generation_is_deterministic_across_contexts(model: Model) -> None:
    a, b = Context(model, **SMALL), Context(model, **SMALL)  # type: ignore[arg-type]
    text_a, text_b = greedy(a, STORY, 16), greedy(b, STORY, 16)
    assert text_a == text_b and text_a
    assert a.tokens == b.tokens
    stats = a.last_stats
    assert stats is not None
    assert stats.generated_tokens == 16 and stats.stop_reason == "length"
    assert stats.prompt_tokens == len(model.tokenize(STORY, special=True))


def test_two_calls_continue_exactly_like_one(model: Model) -> None:
    first = model.tokenize(SYSTEM, special=True)
    second = model.tokenize(STORY, add_bos=False, special=True)
    assert model.tokenize(SYSTEM + STORY, special=True) == first + second

    split = Context(model, **SMALL)  # type: ignore[arg-type]
    assert greedy(split, SYSTEM, 0) == ""
    assert split.tokens == first
    continued = greedy(split, STORY, 12)

    whole = Context(model, **SMALL)  # type: ignore[arg-type]
    at_once = greedy(whole, SYSTEM + STORY, 12)
    assert_same_output(continued, at_once)
    assert split.tokens == whole.tokens
    assert split.token_count() == len(first) + len(second) + 12


def test_bos_is_added_only_to_an_empty_context(model: Model, ctx: Context) -> None:
    greedy(ctx, "Hello", 0)
    greedy(ctx, " there", 0)
    assert ctx.tokens == model.tokenize("Hello", special=True) + model.tokenize(
        " there", add_bos=False, special=True
    )


def test_generated_tokens_stay_in_the_context(model: Model, ctx: Context) -> None:
    greedy(ctx, STORY, 0)
    held = ctx.token_count()
    text = greedy(ctx, "", 10)
    assert ctx.token_count() == held + 10
    assert model.detokenize(ctx.tokens[held:]) == text


def test_an_empty_prompt_continues_the_generation(model: Model) -> None:
    one = Context(model, **SMALL)  # type: ignore[arg-type]
    whole = greedy(one, STORY, 12)
    two = Context(model, **SMALL)  # type: ignore[arg-type]
    halves = greedy(two, STORY, 6) + greedy(two, "", 6)
    assert_same_output(halves, whole)
    assert one.tokens == two.tokens


def test_truncate_then_generate_reproduces_the_continuation(ctx: Context) -> None:
    greedy(ctx, SYSTEM, 0)
    k = ctx.token_count()
    original = greedy(ctx, STORY, 10)
    tokens = ctx.tokens
    for keep in (k + 5, k + 1, k):
        ctx.truncate(keep)
        assert ctx.token_count() == keep
        assert ctx.tokens == tokens[:keep]
    assert_same_output(greedy(ctx, STORY, 10), original)
    assert ctx.tokens == tokens


def test_truncate_in_the_middle_of_a_generation_replays_it(ctx: Context) -> None:
    greedy(ctx, STORY, 0)
    k = ctx.token_count()
    greedy(ctx, "", 12)
    tokens = ctx.tokens
    assert len(tokens) == k + 12  # 12 generated tokens to replay, not an empty generation
    ctx.truncate(k + 4)
    greedy(ctx, "", 8)
    assert ctx.tokens == tokens


def test_truncate_out_of_range(ctx: Context) -> None:
    greedy(ctx, "Hello", 0)
    with pytest.raises(InvalidParameterError, match=r"invalid n: expected 0 <= n <= 1 .* found 2"):
        ctx.truncate(2)
    with pytest.raises(InvalidParameterError, match="invalid n"):
        ctx.truncate(-1)
    assert ctx.token_count() == 1


def test_reset_empties_the_context(ctx: Context) -> None:
    first = greedy(ctx, STORY, 6)
    ctx.reset()
    assert ctx.tokens == [] and ctx.token_count() == 0
    assert_same_output(greedy(ctx, STORY, 6), first)


def test_overflow_raises_before_decoding_and_changes_nothing(model: Model) -> None:
    ctx = Context(model, n_ctx=256, n_batch=64)
    assert ctx.n_ctx == 256
    greedy(ctx, SYSTEM, 0)
    before = ctx.tokens
    long_prompt = "lighthouse " * 300
    with pytest.raises(ContextFullError, match=rf"only {256 - len(before)} of n_ctx=256 are free"):
        ctx.generate(long_prompt, max_tokens=4)
    with pytest.raises(ContextFullError):
        ctx.stream(long_prompt, max_tokens=4)
    assert ctx.tokens == before
    reference = Context(model, n_ctx=256, n_batch=64)
    assert_same_output(greedy(ctx, STORY, 6), greedy(reference, SYSTEM + STORY, 6))


def test_generation_stops_when_the_context_is_full(model: Model) -> None:
    ctx = Context(model, n_ctx=256, n_batch=64)
    greedy(ctx, STORY, 0)
    free = 256 - ctx.token_count()
    text = ctx.generate("", max_tokens=1000, temperature=0.7, seed=1, stop=None)
    stats = ctx.last_stats
    assert stats is not None
    if stats.stop_reason == "context_full":
        assert stats.generated_tokens == free and ctx.token_count() == 256
    else:
        assert stats.stop_reason == "eog" and text


def test_long_prompts_are_decoded_in_batches(model: Model) -> None:
    prompt = "lighthouse " * 150
    small = Context(model, n_ctx=512, n_batch=16)
    large = Context(model, n_ctx=512, n_batch=512)
    assert_same_output(greedy(small, prompt, 5), greedy(large, prompt, 5))
    assert small.tokens == large.tokens


def test_stop_strings_end_generation_and_are_not_returned(model: Model) -> None:
    free = greedy(Context(model, **SMALL), STORY, 24)  # type: ignore[arg-type]
    stop = free[10:14]
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    text = ctx.generate(STORY, max_tokens=24, temperature=0, stop=["never appears", stop])
    assert_same_output(text, free[: free.index(stop)])
    stats = ctx.last_stats
    assert stats is not None and stats.stop_reason == "stop"


def test_stream_yields_the_same_text_as_generate(model: Model) -> None:
    whole = greedy(Context(model, **SMALL), STORY, 20)  # type: ignore[arg-type]
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    pieces = list(ctx.stream(STORY, max_tokens=20, temperature=0))
    assert len(pieces) > 1
    assert_same_output("".join(pieces), whole)
    stats = ctx.last_stats
    assert stats is not None and stats.generated_tokens == 20


def test_stream_never_splits_multibyte_characters(model: Model, ctx: Context) -> None:
    prompt = "<|im_start|>user\nRepeat exactly: 🐉🏮🐉🏮 東京タワー 🐉🏮<|im_end|>\n<|im_start|>assistant\n"
    pieces = list(ctx.stream(prompt, max_tokens=24, temperature=0))
    # Each emoji here is four bytes spread over two or three tokens: every piece holds whole characters.
    assert pieces[4:8] == ["🐉", "🏮", "🐉", "🏮"]
    # The generation stops at max_tokens in the middle of a character: only the very end is incomplete.
    assert all("\ufffd" not in piece for piece in pieces[:-1])
    assert pieces[-1] == "\ufffd"


def test_a_stream_overtaken_by_another_call_says_so(ctx: Context) -> None:
    stream = ctx.stream(STORY, max_tokens=10, temperature=0)
    next(stream)
    ctx.truncate(3)
    with pytest.raises(StreamInvalidatedError):
        next(stream)
    assert list(stream) == []
    assert ctx.token_count() == 3


def test_sampling_is_reproducible_with_a_seed(model: Model) -> None:
    def sample(seed: int) -> str:
        return Context(model, **SMALL).generate(STORY, max_tokens=12, temperature=1.0, seed=seed)  # type: ignore[arg-type]

    assert_same_output(sample(7), sample(7))
    assert len({sample(s) for s in range(4)}) > 1


def test_unknown_token_ids_never_reach_llama_cpp(model: Model) -> None:
    with pytest.raises(TokenizeError):
        model.detokenize([model.n_vocab + 5])


@pytest.mark.parametrize(
    ("overrides", "parameter"),
    [
        ({"n_ctx": 0}, "n_ctx"),
        ({"n_ctx": -5}, "n_ctx"),
        ({"n_ctx": 8193}, "n_ctx"),
        ({"n_batch": 0}, "n_batch"),
        ({"n_threads": 0}, "n_threads"),
        ({"n_seq_max": 0}, "n_seq_max"),
        ({"n_seq_max": 100_000}, "n_seq_max"),
        ({"type_k": "f32"}, "type_k"),
        ({"type_v": "q8_0"}, "type_v"),
        ({"type_v": "q4_0", "flash_attn": False}, "type_v"),
        ({"flash_attn": "auto"}, "flash_attn"),
        ({"flash_attn": 1}, "flash_attn"),
    ],
)
def test_invalid_parameters_raise_value_errors_naming_them(
    model: Model, overrides: dict[str, object], parameter: str
) -> None:
    params = ContextParams().replace(n_ctx=512)
    for make in (
        lambda: Context(model, **overrides),  # type: ignore[arg-type]
        lambda: Context(model, params, **overrides),  # type: ignore[arg-type]
    ):
        with pytest.raises(
            InvalidParameterError, match=rf"^invalid {parameter}: expected .*, found "
        ) as error:
            make()
        assert type(error.value) is InvalidParameterError


def test_unknown_parameter_names_are_type_errors(model: Model) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_ctxx'"):
        Context(model, n_ctxx=512)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_invalid_sampling_parameters(ctx: Context, kwargs: dict[str, object], parameter: str) -> None:
    with pytest.raises(InvalidParameterError, match=rf"^invalid {parameter}"):
        ctx.generate("Hi", **kwargs)  # type: ignore[arg-type]
    assert ctx.token_count() == 0


def test_params_are_typed_and_immutable(model: Model) -> None:
    params = ContextParams(n_ctx=1024, type_k="q8_0", type_v="q8_0", flash_attn=True)
    assert params.n_ctx == 1024 and params.type_v == "q8_0" and params.flash_attn is True
    assert params.replace(n_ctx=512) == ContextParams(
        n_ctx=512, type_k="q8_0", type_v="q8_0", flash_attn=True
    )
    assert params.n_ctx == 1024
    with pytest.raises(AttributeError):
        params.n_ctx = 5  # type: ignore[misc]
    ctx = Context(model, params, n_batch=128)
    assert ctx.params == params.replace(n_batch=128)
    assert "type_k='q8_0'" in repr(params) or 'type_k="q8_0"' in repr(params)


@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
def test_every_kv_type_generates_deterministically(model: Model, kv: str) -> None:
    params = ContextParams(n_ctx=512, n_batch=64, type_k=kv, type_v=kv, flash_attn=True)  # type: ignore[arg-type]
    a = greedy(Context(model, params), STORY, 8)
    b = greedy(Context(model, params), STORY, 8)
    assert a == b and a
