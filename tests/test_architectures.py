"""Every memory kind llama.cpp runs, on tiny random-weight models (see conftest.arch_model_paths): plain
attention (llama), sliding window (gemma3, window 16, prompts several times longer), hybrid (lfm2) and
recurrent (mamba2). Each operation of docs/architectures.md's table is checked here, exactly."""

from __future__ import annotations

import pathlib
import struct
from typing import TYPE_CHECKING

import pytest
import xxhash

from llama_sessions import (
    Context,
    Model,
    SessionCorruptError,
    SessionInteropWarning,
    SessionManager,
    SessionParamsMismatchError,
    SessionVersionError,
)

from conftest import ARCH_MODELS, GEMMA3_N_SWA, assert_same_output

if TYPE_CHECKING:
    from llama_sessions._native import KvType

#: About 90 tokens: several times gemma3's window.
LONG_PROMPT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his father "
    "had, and lit the great lamp that swept across the bay. Ships passed in the night, their lanterns "
    "swaying, and the keeper wrote each one into his logbook with the hour, the wind and the colour of the "
    "sea. One winter a dragon came out of the fog"
)
MORE = " and then the keeper said"
#: One thread: the models are tiny, and on a busy machine llama.cpp's threads wait on each other for seconds.
THREADS = 1


@pytest.fixture(scope="module", params=list(ARCH_MODELS))
def arch(request: pytest.FixtureRequest, arch_model_paths: dict[str, pathlib.Path]) -> tuple[str, Model]:
    name: str = request.param
    return name, Model.load(arch_model_paths[name])


def kv_types(model: Model) -> list[KvType]:
    """Every KV type where the model has a KV cache."""
    return ["f16"] if model.memory == "recurrent" else ["f16", "q8_0", "q4_0"]


def new_context(model: Model, kv: KvType = "f16", n_seq_max: int = 1) -> Context:
    return Context(
        model,
        n_ctx=256 * n_seq_max,
        n_batch=32,
        type_k=kv,
        type_v=kv,
        flash_attn=kv != "f16",
        n_seq_max=n_seq_max,
        n_threads=THREADS,
    )


def continuation(ctx: Context, prompt: str = MORE, seq: int = 0) -> list[int]:
    before = ctx.token_count(seq)
    ctx.generate(prompt, max_tokens=8, temperature=0.0, seq=seq)
    generated = ctx.sequence_tokens(seq)[
        before + len(ctx.model.tokenize(prompt, add_bos=False, special=True)) :
    ]
    assert generated, "empty generation"
    return generated


def prepared(model: Model, kv: KvType = "f16", n_seq_max: int = 1, seq: int = 0) -> Context:
    ctx = new_context(model, kv, n_seq_max)
    ctx.generate(LONG_PROMPT, max_tokens=6, temperature=0.0, seq=seq)
    assert ctx.token_count(seq) > 4 * GEMMA3_N_SWA
    return ctx


def test_model_reports_its_memory(arch: tuple[str, Model]) -> None:
    name, model = arch
    assert model.memory == ARCH_MODELS[name]
    assert model.partial_truncation == (model.memory in ("attention", "sliding_window"))
    assert model.n_swa == (GEMMA3_N_SWA if name == "tiny-gemma3" else 0)


def test_what_came_before_changes_the_answer(arch: tuple[str, Model]) -> None:
    # Prompts that end alike continue differently, so a state lost in a round trip would show.
    _, model = arch
    a, b = new_context(model), new_context(model)
    assert continuation(a, "A dragon came out of the fog and") != continuation(
        b, "The keeper counted the stairs and"
    )


def test_file_and_snapshot_round_trips_continue_identically(
    arch: tuple[str, Model], tmp_path: pathlib.Path
) -> None:
    name, model = arch
    for kv in kv_types(model):
        original = prepared(model, kv)
        snapshot = original.snapshot()
        path = tmp_path / f"{name}-{kv}.session"
        original.save_session(path)
        held = original.tokens
        expected = continuation(original)

        from_snapshot = new_context(model, kv)
        from_snapshot.restore(snapshot)
        assert from_snapshot.tokens == held
        assert_same_output(continuation(from_snapshot), expected)

        from_file = new_context(model, kv)
        from_file.load_session(path)
        assert_same_output(continuation(from_file), expected)

        created = Context.from_session(model, path, n_threads=THREADS)
        assert_same_output(continuation(created), expected)


def test_restore_into_another_sequence_and_copy(arch: tuple[str, Model]) -> None:
    _, model = arch
    for kv in kv_types(model):
        reference = prepared(model, kv, n_seq_max=2)
        snapshot = reference.snapshot(seq=0)
        expected = continuation(reference)
        two = new_context(model, kv, n_seq_max=2)
        two.restore(snapshot, seq=1)
        two.copy_sequence(1, 0)
        assert_same_output(continuation(two, seq=1), expected)
        assert_same_output(continuation(two, seq=0), expected)


def test_saved_after_generation_restores_to_the_same_state(arch: tuple[str, Model]) -> None:
    _, model = arch
    ctx = prepared(model)
    continuation(ctx)
    snapshot = ctx.snapshot()
    expected = continuation(ctx, " Later")
    fresh = new_context(model)
    fresh.restore(snapshot)
    assert fresh.snapshot()[-200:-16] == snapshot[-200:-16]
    assert_same_output(continuation(fresh, " Later"), expected)


def test_truncate_continues_as_a_fresh_context(arch: tuple[str, Model]) -> None:
    # On recurrent memory truncate decodes the kept tokens again: never a silent no-op.
    _, model = arch
    ctx = prepared(model)
    n = len(model.tokenize(LONG_PROMPT))
    kept = ctx.tokens[:n]
    ctx.truncate(n)
    assert ctx.tokens == kept
    fresh = new_context(model)
    fresh.generate(LONG_PROMPT, max_tokens=0)
    assert fresh.tokens == kept
    assert_same_output(continuation(ctx), continuation(fresh))


def test_manager_prefix_reuse_and_revert(arch: tuple[str, Model], tmp_path: pathlib.Path) -> None:
    name, model = arch
    manager = SessionManager(model, tmp_path, n_ctx=256, n_batch=32, n_threads=THREADS)
    manager.create_session("s")
    first, reused = manager.generate_reusing_prefix("s", LONG_PROMPT, 6, temperature=0.0)
    assert reused == 0
    manager.checkpoint("s", "start")
    edited = LONG_PROMPT + " that nobody saw"
    answer, reused = manager.generate_reusing_prefix("s", edited, 8, temperature=0.0)
    fresh = new_context(model)
    expected = fresh.generate(edited, max_tokens=8, temperature=0.0)
    assert answer == expected and expected
    if not model.partial_truncation:
        # The held answer cannot be cut off in place: the state checkpoint taken at the end of the prompt
        # serves, and only what follows it is decoded again.
        assert reused == len(model.tokenize(LONG_PROMPT, special=True))
    else:
        assert reused > 0
    manager.revert("s", "start")
    again, _ = manager.generate_reusing_prefix("s", edited, 8, temperature=0.0)
    assert again == expected
    del first, name


def test_header_with_other_memory_geometry_is_a_params_mismatch(
    arch_model_paths: dict[str, pathlib.Path],
) -> None:
    model = Model.load(arch_model_paths["tiny-gemma3"])
    snapshot = bytearray(prepared(model).snapshot())
    needle = f'"n_swa":{GEMMA3_N_SWA}'.encode()
    at = snapshot.find(needle)
    assert at > 0
    snapshot[at : at + len(needle)] = f'"n_swa":{GEMMA3_N_SWA + 1}'.encode()
    reseal(snapshot)
    with pytest.raises(SessionParamsMismatchError, match="n_swa"):
        new_context(model).restore(bytes(snapshot))


def reseal(data: bytearray) -> None:
    """Rewrites the checksum after an edit, as an attacker who can write the file would."""
    data[-16:] = xxhash.xxh3_128_intdigest(bytes(data[:-16])).to_bytes(16, "little")


def test_recurrent_state_with_two_cells_never_reaches_llama_cpp(
    arch_model_paths: dict[str, pathlib.Path],
) -> None:
    for name in ("tiny-mamba2", "tiny-lfm2"):
        model = Model.load(arch_model_paths[name])
        source = prepared(model)
        snapshot = bytearray(source.snapshot())
        n = source.token_count()
        cell = struct.pack("<Iii", 1, n - 1, 0)
        at = snapshot.find(cell)
        assert at > 0
        target = prepared(model)
        before = target.tokens
        expected = continuation(prepared(model))
        for offset, value in ((0, 2), (4, 3), (8, 1)):
            forged = bytearray(snapshot)
            forged[at + offset : at + offset + 4] = struct.pack("<i", value)
            reseal(forged)
            with pytest.raises(SessionCorruptError, match="recurrent"):
                target.restore(bytes(forged))
            assert target.tokens == before
        assert_same_output(continuation(target), expected)


def test_continuing_without_a_prompt_after_a_restore(arch: tuple[str, Model]) -> None:
    # The last token's logits are not in a state: the restored context decodes the last token again (on
    # recurrent memory, which cannot drop it, the whole sequence from the start) and continues as the
    # original does.
    _, model = arch
    original = prepared(model)
    snapshot = original.snapshot()
    expected = original.generate("", max_tokens=10, temperature=0.0)
    restored = new_context(model)
    restored.restore(snapshot)
    assert_same_output(restored.generate("", max_tokens=10, temperature=0.0), expected)


def test_llama_cpp_session_files_are_for_one_kv_cache(
    arch: tuple[str, Model], tmp_path: pathlib.Path
) -> None:
    # llama.cpp's own whole-context file is read for plain attention only; the others are refused before
    # llama.cpp sees the state, with the context unchanged.
    _, model = arch
    ctx = prepared(model)
    path = tmp_path / "llama.session"
    ctx.save_session(path, format="llama.cpp")
    target = prepared(model)
    before = target.tokens
    if model.memory == "attention":
        with pytest.warns(SessionInteropWarning):
            target.load_session(path)
        assert target.tokens == ctx.tokens
    else:
        with pytest.raises(SessionVersionError, match="one KV cache"):
            target.load_session(path)
        assert target.tokens == before
