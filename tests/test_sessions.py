"""Sessions: save/load and snapshot/restore round trips, verification of every byte, mismatches, a writer
killed mid-save, sequences, llama.cpp interop and the size of the saved state."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

import pytest
import xxhash

from llama_sessions import (
    Context,
    ContextParams,
    InvalidParameterError,
    Model,
    SessionCorruptError,
    SessionInfo,
    SessionInteropWarning,
    SessionModelMismatchError,
    SessionParamsMismatchError,
    SessionVersionError,
    inspect_session,
)

from conftest import SMALL, STORY, SYSTEM, assert_same_output, fail_in_ci_or_skip, require_tool

MAGIC = b"\x89LLSESS\n"
PRELUDE_LEN = 32
CHECKSUM_LEN = 16
#: llama.cpp's own session file: the u32 0x6767736e ("ggsn") little-endian, then its version 11.
LLAMA_CPP_MAGIC = b"nsgg"
LLAMA_CPP_VERSION = 11

#: A prompt that leaves another state than SYSTEM in a context that a failed load must not change.
OTHER = "<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n"
PARAGRAPH = (
    "The keeper of the old lighthouse climbed the spiral stairs every evening, polished the brass lamp, "
    "and watched the dragon circle the cliffs until the tide turned. "
)
METADATA = {"title": "dragon", "turn": 3, "nested": {"list": [1, 2.5, None, True, {"deep": "é🐉"}]}}


def greedy(ctx: Context, prompt: str, n: int, seq: int = 0) -> str:
    text = ctx.generate(prompt, max_tokens=n, temperature=0, seq=seq)
    assert ctx.token_count(seq) == len(ctx.sequence_tokens(seq))
    return text


def prepared(model: Model, prompt: str = SYSTEM, n: int = 0, **params: object) -> Context:
    """A context (SMALL unless overridden) that encoded ``prompt`` and generated ``n`` greedy tokens."""
    ctx = Context(model, **{**SMALL, **params})  # type: ignore[arg-type]
    greedy(ctx, prompt, n)
    return ctx


def layout(data: bytes) -> tuple[int, int]:
    """(header length, state length) of well-formed session bytes."""
    assert data[:8] == MAGIC
    _version, header_len, state_len = struct.unpack_from("<IIQ", data, 8)
    assert len(data) == PRELUDE_LEN + header_len + state_len + CHECKSUM_LEN
    return header_len, state_len


def header_of(data: bytes) -> dict[str, object]:
    header_len, _ = layout(data)
    header = json.loads(data[PRELUDE_LEN : PRELUDE_LEN + header_len])
    assert isinstance(header, dict)
    return header


def state_of(data: bytes) -> bytes:
    header_len, state_len = layout(data)
    return data[PRELUDE_LEN + header_len : PRELUDE_LEN + header_len + state_len]


def kv_state(ctx: Context) -> bytes:
    """The llama.cpp state bytes of everything the context holds (what a failed load must not change)."""
    return state_of(ctx.snapshot())


def loaders(ctx: Context, path: pathlib.Path, data: bytes) -> list[tuple[str, Callable[[], object]]]:
    """The two ways of loading a session into ``ctx``: from the file ``path``, from the bytes ``data``."""
    return [("load_session", lambda: ctx.load_session(path)), ("restore", lambda: ctx.restore(data))]


def assert_unchanged(ctx: Context, twin: Context) -> None:
    """``ctx`` holds what ``twin`` (prepared the same way, never touched by a failed load) holds, and both
    continue with the same greedy tokens. Moves both forward by the same generation."""
    assert ctx.tokens == twin.tokens
    assert_same_output(greedy(ctx, STORY, 8), greedy(twin, STORY, 8))
    assert ctx.tokens == twin.tokens


# XXH3, to forge sessions whose checks are right. The 64-bit hash of the 24-byte prelude is computed here (the
# 17-to-32-byte case of XXH3 with the default secret); the tests that use it check it against the library's.
_M64 = (1 << 64) - 1
_XXH_PRIME64_1 = 0x9E3779B185EBCA87
_XXH3_SECRET = bytes.fromhex("b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f")


def _xxh3_mix16(data: bytes, secret: bytes) -> int:
    lo = int.from_bytes(data[:8], "little") ^ int.from_bytes(secret[:8], "little")
    hi = int.from_bytes(data[8:16], "little") ^ int.from_bytes(secret[8:16], "little")
    product = lo * hi
    return (product & _M64) ^ (product >> 64)


def xxh3_64_short(data: bytes) -> int:
    """XXH3-64 (seed 0) of 17 to 32 bytes."""
    assert 17 <= len(data) <= 32
    acc = (len(data) * _XXH_PRIME64_1) & _M64
    acc = (
        acc + _xxh3_mix16(data[:16], _XXH3_SECRET[:16]) + _xxh3_mix16(data[-16:], _XXH3_SECRET[16:])
    ) & _M64
    acc ^= acc >> 37
    acc = (acc * 0x165667919E3779F9) & _M64
    return acc ^ (acc >> 32)


def xxh3_128(data: bytes) -> int:
    """XXH3-128 of any length (the trailing checksum), from the xxhash package (in the ``test`` extra)."""
    return xxhash.xxh3_128_intdigest(data)


def prelude_check(prelude: bytes) -> bytes:
    return xxh3_64_short(prelude[:24]).to_bytes(8, "little")


def forge(version: int, header: bytes, state: bytes) -> bytes:
    """Session bytes with every check right: the prelude check and the trailing XXH3-128 checksum."""
    prelude = MAGIC + struct.pack("<IIQ", version, len(header), len(state))
    body = prelude + prelude_check(prelude) + header + state
    return body + xxh3_128(body).to_bytes(16, "little")


# ---------------------------------------------------------------------------------------------------------
# Round trips


def check_info(info: SessionInfo, ctx: Context, tokens: list[int], metadata: dict[str, object]) -> None:
    assert info.format == "llama-sessions" and info.format_version == 1
    assert info.token_count == len(tokens)
    assert info.sequences == {0: tokens}
    assert info.metadata == metadata
    assert info.params is not None
    assert info.params.replace(n_threads=ctx.params.n_threads) == ctx.params
    assert info.model_fingerprint == ctx.model.fingerprint
    assert info.model_architecture == ctx.model.architecture
    assert info.model_file_name == ctx.model.path.name
    assert info.library_version is not None and info.llama_cpp_build is not None
    created = info.created_at
    assert created is not None and created.tzinfo is not None
    assert created.utcoffset() == datetime.timedelta(0)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert now - datetime.timedelta(minutes=5) < created <= now + datetime.timedelta(seconds=1)
    assert info.total_bytes == PRELUDE_LEN + info.header_bytes + info.state_bytes + CHECKSUM_LEN


def check_round_trip(
    model: Model, tmp_path: pathlib.Path, prepare: Callable[[Context], None], **params: object
) -> None:
    """Prepare a context, save it (file and snapshot), note its greedy continuation, and check that a fresh
    context loading the file, another restoring the snapshot, and the original restoring the snapshot all
    hold the same tokens and continue with the same tokens."""
    all_params = {**SMALL, **params}
    ctx = Context(model, **all_params)  # type: ignore[arg-type]
    prepare(ctx)
    saved = ctx.tokens
    assert saved
    path = tmp_path / "round-trip.session"
    info = ctx.save_session(path, metadata=METADATA)
    data = ctx.snapshot(metadata=METADATA)
    file_bytes = path.read_bytes()
    check_info(info, ctx, saved, METADATA)
    assert info.total_bytes == len(file_bytes) == path.stat().st_size
    check_info(inspect_session(path), ctx, saved, METADATA)
    check_info(inspect_session(data), ctx, saved, METADATA)
    # The file and the snapshot hold the same state bytes and the same header (but for the time of writing).
    assert state_of(file_bytes) == state_of(data)
    file_header, data_header = header_of(file_bytes), header_of(data)
    file_header.pop("created_at")
    data_header.pop("created_at")
    assert file_header == data_header

    expected = greedy(ctx, STORY, 12)
    expected_tokens = ctx.tokens
    assert expected and len(expected_tokens) > len(saved)

    fresh = Context(model, **all_params)  # type: ignore[arg-type]
    loaded = fresh.load_session(path)
    check_info(loaded, fresh, saved, METADATA)
    assert fresh.tokens == saved and fresh.token_count() == len(saved)
    # Saving what was loaded gives back the same state, byte for byte.
    assert kv_state(fresh) == state_of(file_bytes)
    assert_same_output(greedy(fresh, STORY, 12), expected)
    assert fresh.tokens == expected_tokens

    other = Context(model, **all_params)  # type: ignore[arg-type]
    restored = other.restore(data)
    check_info(restored, other, saved, METADATA)
    assert other.tokens == saved and other.token_count() == len(saved)
    assert_same_output(greedy(other, STORY, 12), expected)
    assert other.tokens == expected_tokens

    # Undo: the original context, which moved on, goes back and continues the same way again.
    ctx.restore(data)
    assert ctx.tokens == saved and ctx.token_count() == len(saved)
    assert_same_output(greedy(ctx, STORY, 12), expected)
    assert ctx.tokens == expected_tokens


def encode_system(ctx: Context) -> None:
    assert greedy(ctx, SYSTEM, 0) == ""


def test_file_and_snapshot_round_trips_continue_identically(model: Model, tmp_path: pathlib.Path) -> None:
    check_round_trip(model, tmp_path, encode_system)


@pytest.mark.parametrize(
    ("kv", "flash_attn"), [("f16", False), ("f16", True), ("q8_0", True), ("q4_0", True)]
)
def test_round_trips_for_every_kv_type(
    model: Model, tmp_path: pathlib.Path, kv: str, flash_attn: bool
) -> None:
    check_round_trip(
        model,
        tmp_path,
        encode_system,
        type_k=kv,
        type_v=kv,
        flash_attn=flash_attn,
    )


def test_round_trip_after_a_generation(model: Model, tmp_path: pathlib.Path) -> None:
    def prepare(ctx: Context) -> None:
        assert greedy(ctx, SYSTEM + STORY, 10)

    check_round_trip(model, tmp_path, prepare)


def test_round_trip_after_truncate(model: Model, tmp_path: pathlib.Path) -> None:
    def prepare(ctx: Context) -> None:
        greedy(ctx, SYSTEM, 0)
        held = ctx.token_count()
        greedy(ctx, STORY, 10)
        ctx.truncate(held + 3)
        assert ctx.token_count() == held + 3

    check_round_trip(model, tmp_path, prepare)


def test_a_snapshot_of_an_empty_context_restores_to_empty(model: Model) -> None:
    empty = Context(model, **SMALL)  # type: ignore[arg-type]
    data = empty.snapshot()
    assert inspect_session(data).sequences == {}
    ctx = prepared(model, OTHER, 4)
    ctx.restore(data)
    assert ctx.tokens == [] and ctx.token_count() == 0
    assert_same_output(greedy(ctx, STORY, 8), greedy(Context(model, **SMALL), STORY, 8))  # type: ignore[arg-type]


def test_from_session_creates_a_context_with_the_saved_params(model: Model, tmp_path: pathlib.Path) -> None:
    params = ContextParams(n_ctx=768, n_batch=32, type_k="q8_0", type_v="q8_0", flash_attn=True)
    ctx = Context(model, params)
    greedy(ctx, SYSTEM, 0)
    saved = ctx.tokens
    path = tmp_path / "from.session"
    ctx.save_session(path)
    expected = greedy(ctx, STORY, 12)
    expected_tokens = ctx.tokens

    created = Context.from_session(model, path)
    assert created.params.replace(n_threads=ctx.params.n_threads) == ctx.params
    assert created.n_ctx == 768 and created.params.n_batch == 32 and created.params.type_v == "q8_0"
    assert created.tokens == saved
    assert_same_output(greedy(created, STORY, 12), expected)
    assert created.tokens == expected_tokens

    one_thread = Context.from_session(model, path, n_threads=1)
    assert one_thread.params == ctx.params.replace(n_threads=1)
    assert_same_output(greedy(one_thread, STORY, 12), expected)


# ---------------------------------------------------------------------------------------------------------
# Mismatches and versions


def test_a_session_of_other_weights_is_a_model_mismatch(
    model: Model, variant_model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    variant = Model.load(variant_model_path)
    assert variant.fingerprint != model.fingerprint
    for saver, loader in ((variant, model), (model, variant)):
        path = tmp_path / "other-weights.session"
        source = prepared(saver)
        source.save_session(path)
        data = source.snapshot()
        ctx, twin = prepared(loader, OTHER, 4), prepared(loader, OTHER, 4)
        for _, load in loaders(ctx, path, data):
            with pytest.raises(SessionModelMismatchError) as excinfo:
                load()
            assert type(excinfo.value) is SessionModelMismatchError
            message = str(excinfo.value)
            assert saver.fingerprint in message and loader.fingerprint in message
            assert message.index(saver.fingerprint) < message.index(loader.fingerprint)
        assert_unchanged(ctx, twin)


BASE_PARAMS = {
    "n_ctx": 512,
    "n_batch": 64,
    "type_k": "f16",
    "type_v": "f16",
    "flash_attn": True,
    "n_seq_max": 1,
}


@pytest.mark.parametrize(
    ("name", "current"),
    [
        ("n_ctx", 768),
        ("n_batch", 32),
        ("type_k", "q8_0"),
        ("type_v", "q8_0"),
        ("flash_attn", False),
        ("n_seq_max", 2),
    ],
)
def test_each_state_relevant_parameter_mismatch_is_named(
    model: Model, tmp_path: pathlib.Path, name: str, current: object
) -> None:
    saved_params = ContextParams(**BASE_PARAMS)  # type: ignore[arg-type]
    current_params = saved_params.replace(**{name: current})  # type: ignore[arg-type]
    source = Context(model, saved_params)
    greedy(source, SYSTEM, 0)
    path = tmp_path / "params.session"
    source.save_session(path)
    data = source.snapshot()

    ctx, twin = Context(model, current_params), Context(model, current_params)
    greedy(ctx, OTHER, 4)
    greedy(twin, OTHER, 4)
    tokens, state = ctx.tokens, kv_state(ctx)
    errors = []
    for _, load in loaders(ctx, path, data):
        with pytest.raises(SessionParamsMismatchError) as excinfo:
            load()
        assert type(excinfo.value) is SessionParamsMismatchError
        assert ctx.tokens == tokens and kv_state(ctx) == state
        errors.append(excinfo.value)
    assert_unchanged(ctx, twin)
    for error in errors:
        assert set(error.mismatches) == {name}
        message = str(error)
        assert f"{name} saved " in message
        assert all(f"{other} saved " not in message for other in BASE_PARAMS if other != name)
        # (saved, current), each of the ContextParams field's own type (an int stays an int, a bool a bool).
        saved, current_value = error.mismatches[name]
        assert (saved, current_value) == (getattr(saved_params, name), getattr(current_params, name))
        assert type(saved) is type(getattr(saved_params, name))
        assert type(current_value) is type(getattr(current_params, name))
        assert message.endswith(
            "(create the context with the saved parameters, e.g. with Context.from_session)"
        )
        assert error.advice == "create the context with the saved parameters, e.g. with Context.from_session"


def test_a_newer_format_version_is_a_version_error(model: Model, tmp_path: pathlib.Path) -> None:
    data = prepared(model).snapshot()
    assert data[24:32] == prelude_check(data[:32])  # the XXH3-64 here agrees with the library's
    newer = bytearray(data)
    newer[8:12] = struct.pack("<I", 2)
    newer[24:32] = prelude_check(bytes(newer[:24]))
    header_len, _ = layout(data)
    forged = [bytes(newer), forge(2, data[PRELUDE_LEN : PRELUDE_LEN + header_len], state_of(data))]

    ctx, twin = prepared(model, OTHER, 4), prepared(model, OTHER, 4)
    tokens, state = ctx.tokens, kv_state(ctx)
    path = tmp_path / "newer.session"
    for session in forged:
        path.write_bytes(session)
        for _, load in loaders(ctx, path, session):
            with pytest.raises(SessionVersionError, match="version 2") as excinfo:
                load()
            assert type(excinfo.value) is SessionVersionError
            assert ctx.tokens == tokens and kv_state(ctx) == state
        with pytest.raises(SessionVersionError, match="version 2"):
            inspect_session(path)
        with pytest.raises(SessionVersionError):
            Context.from_session(model, path)

    # Version 0 never existed: that is corruption, not a newer version.
    zero = bytearray(data)
    zero[8:12] = struct.pack("<I", 0)
    zero[24:32] = prelude_check(bytes(zero[:24]))
    with pytest.raises(SessionCorruptError) as corrupt:
        ctx.restore(bytes(zero))
    assert type(corrupt.value) is SessionCorruptError
    assert_unchanged(ctx, twin)


def test_another_llama_cpp_build_is_a_version_error(model: Model, tmp_path: pathlib.Path) -> None:
    source = prepared(model)
    data = source.snapshot()
    assert data[-16:] == xxh3_128(data[:-16]).to_bytes(16, "little")
    header = header_of(data)
    build = header["llama_cpp_build"]
    assert isinstance(build, str) and build

    def rewritten(**changes: object) -> bytes:
        text = json.dumps({**header, **changes}, separators=(",", ":"), ensure_ascii=False)
        return forge(1, text.encode(), state_of(data))

    ctx, twin = prepared(model, OTHER, 4), prepared(model, OTHER, 4)
    tokens, state = ctx.tokens, kv_state(ctx)
    path = tmp_path / "build.session"
    other_build = "llama-cpp-sys-2 0.0.1"
    forged = rewritten(llama_cpp_build=other_build)
    path.write_bytes(forged)
    assert inspect_session(path).llama_cpp_build == other_build
    for _, load in loaders(ctx, path, forged):
        with pytest.raises(SessionVersionError) as excinfo:
            load()
        assert type(excinfo.value) is SessionVersionError
        assert other_build in str(excinfo.value) and build in str(excinfo.value)
        assert ctx.tokens == tokens and kv_state(ctx) == state
    assert_unchanged(ctx, twin)

    # Control: the same rewriting with the build unchanged loads, so the error above is about the build.
    control = Context(model, **SMALL)  # type: ignore[arg-type]
    control.restore(rewritten())
    assert control.tokens == source.tokens
    assert_same_output(greedy(control, STORY, 8), greedy(source, STORY, 8))


# ---------------------------------------------------------------------------------------------------------
# Corruption


def damaged_copies(data: bytes) -> list[tuple[str, bytes]]:
    """Truncations at every kind of offset, ~250 single-bit flips over the whole file, one byte appended."""
    header_len, state_len = layout(data)
    size = len(data)
    state_start = PRELUDE_LEN + header_len
    cuts = {
        "empty": 0,
        "inside the magic": 3,
        "magic only": 8,
        "inside the prelude": 20,
        "prelude only": PRELUDE_LEN,
        "inside the header": PRELUDE_LEN + header_len // 2,
        "header only": state_start,
        "inside the state": state_start + state_len // 2,
        "last state byte missing": state_start + state_len - 1,
        "no checksum": size - CHECKSUM_LEN,
        "inside the checksum": size - CHECKSUM_LEN // 2,
        "last byte missing": size - 1,
    }
    copies = [(f"truncated to {cut} bytes ({what})", data[:cut]) for what, cut in cuts.items()]
    positions = set(range(0, size, size // 200)) | set(range(PRELUDE_LEN))
    positions |= {PRELUDE_LEN, state_start - 1, state_start, state_start + 1, size - CHECKSUM_LEN}
    positions |= set(range(size - 4, size))
    for position in sorted(positions):
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        copies.append((f"bit {position % 8} of byte {position} of {size} flipped", bytes(flipped)))
    copies.append(("one byte appended", data + b"\0"))
    return copies


def test_every_truncation_and_bit_flip_is_corrupt_and_changes_nothing(
    model: Model, tmp_path: pathlib.Path
) -> None:
    data = prepared(model, SYSTEM, 2).snapshot()
    ctx, twin = prepared(model, OTHER, 4), prepared(model, OTHER, 4)
    tokens, state = ctx.tokens, kv_state(ctx)
    path = tmp_path / "damaged.session"
    failures = []
    copies = damaged_copies(data)
    assert len(copies) > 230
    for what, damaged in copies:
        path.write_bytes(damaged)
        calls: list[tuple[str, Callable[[], object]]] = [
            *loaders(ctx, path, damaged),
            ("inspect_session", partial(inspect_session, damaged)),
        ]
        for how, load in calls:
            try:
                load()
            except SessionCorruptError as error:
                if type(error) is not SessionCorruptError:
                    failures.append(f"{what}: {how} raised {type(error).__name__}: {error}")
            except Exception as error:
                failures.append(f"{what}: {how} raised {type(error).__name__}: {error}")
            else:
                failures.append(f"{what}: {how} succeeded")
            if ctx.tokens != tokens or kv_state(ctx) != state:
                failures.append(f"{what}: {how} changed the context")
                ctx, twin = prepared(model, OTHER, 4), prepared(model, OTHER, 4)
    assert not failures, "\n".join(failures[:20])
    assert_unchanged(ctx, twin)


def test_files_that_are_not_sessions_are_corrupt(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with model_path.open("rb") as f:
        gguf_start = f.read(4096)
    assert gguf_start[:4] == b"GGUF"
    not_sessions = {
        "random.bin": random.Random(20261122).randbytes(4096),
        "notes.txt": b"A lighthouse keeper's notes.\nNothing to see here.\n" * 40,
        "model-start.gguf": gguf_start,
        "empty.session": b"",
    }
    ctx, twin = prepared(model, OTHER, 4), prepared(model, OTHER, 4)
    tokens, state = ctx.tokens, kv_state(ctx)
    for name, content in not_sessions.items():
        path = tmp_path / name
        path.write_bytes(content)
        calls: list[tuple[str, Callable[[], object]]] = [
            *loaders(ctx, path, content),
            ("inspect_session", partial(inspect_session, path)),
            ("from_session", partial(Context.from_session, model, path)),
        ]
        for _, load in calls:
            with pytest.raises(SessionCorruptError) as excinfo:
                load()
            assert type(excinfo.value) is SessionCorruptError, name
            assert ctx.tokens == tokens and kv_state(ctx) == state
    missing = tmp_path / "missing.session"
    for load in (
        lambda: ctx.load_session(missing),
        lambda: inspect_session(missing),
        lambda: Context.from_session(model, missing),
    ):
        with pytest.raises(FileNotFoundError):
            load()
    assert_unchanged(ctx, twin)


# ---------------------------------------------------------------------------------------------------------
# A writer killed in the middle of save_session

WRITER = pathlib.Path(__file__).with_name("session_writer.py")
WRITER_PARAMS = {"n_ctx": 1024, "n_batch": 128}
#: Tokens the writer generates (one per save) before it truncates back to the seed's tokens.
WRITER_EXTRA = 24


class Seed:
    """A session with a sizeable state (~450 tokens, ~10 MB) for session_writer.py to start from, and the
    tokens that every version the writer saves must begin with."""

    def __init__(self, path: pathlib.Path, held: int, reference: list[int]) -> None:
        self.path, self.held, self.reference = path, held, reference


@pytest.fixture(scope="module")
def seed(model: Model, tmp_path_factory: pytest.TempPathFactory) -> Seed:
    path = tmp_path_factory.mktemp("seed") / "seed.session"
    ctx = Context(model, **WRITER_PARAMS)  # type: ignore[arg-type]
    greedy(ctx, SYSTEM + PARAGRAPH * 14, 0)
    held = ctx.token_count()
    assert 350 < held < WRITER_PARAMS["n_ctx"] - WRITER_EXTRA
    ctx.save_session(path)
    # The writer loads the seed and generates one greedy token per save: this continuation.
    reference = Context.from_session(model, path)
    greedy(reference, "", WRITER_EXTRA)
    return Seed(path, held, reference.tokens)


def start_writer(
    model_path: pathlib.Path, seed: Seed, path: pathlib.Path, log: pathlib.Path, prefix: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no renames but the writer's own
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [
                *prefix,
                sys.executable,
                str(WRITER),
                str(model_path),
                str(seed.path),
                str(path),
                str(WRITER_EXTRA),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )


def check_survivor(checker: Context, seed: Seed, path: pathlib.Path) -> list[int]:
    """The session at ``path`` is one of the versions the writer saved in full: it loads, and holds the
    seed's tokens followed by the start of the greedy continuation."""
    info = inspect_session(path)
    checker.load_session(path)
    tokens = checker.tokens
    assert info.sequences == {0: tokens}
    assert info.total_bytes == path.stat().st_size
    assert len(tokens) >= seed.held and tokens == seed.reference[: len(tokens)]
    return tokens


def test_a_writer_killed_mid_save_leaves_a_loadable_session(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path, seed: Seed
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = out / "story.session"
    rng = random.Random(5)
    killed_mid_save = 0
    strays: dict[int, list[str]] = {}
    checker = Context(model, **WRITER_PARAMS)  # type: ignore[arg-type]
    for round_ in range(5):
        log = tmp_path / f"writer-{round_}.log"
        writer = start_writer(model_path, seed, path, log)
        watchdog = threading.Timer(60, writer.kill)
        watchdog.start()
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline() == "ready\n", log.read_text()
            # Time a few saves, then kill the writer somewhere inside the next one.
            durations = []
            for _ in range(rng.randint(1, 4)):
                assert writer.stdout.readline() == "saving\n", log.read_text()
                started = time.monotonic()
                assert writer.stdout.readline() == "saved\n", log.read_text()
                durations.append(time.monotonic() - started)
            assert writer.stdout.readline() == "saving\n", log.read_text()
            time.sleep(rng.uniform(0.05, 0.95) * min(durations))
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            rest = writer.stdout.read().split()
        finally:
            watchdog.cancel()
            if writer.poll() is None:
                writer.kill()
                writer.wait()
            if writer.stdout is not None:
                writer.stdout.close()
        assert writer.returncode == -signal.SIGKILL, log.read_text()
        killed_mid_save += not rest or rest[-1] == "saving"

        assert path.name in os.listdir(out)
        check_survivor(checker, seed, path)
        # A later save to the same path works.
        checker.save_session(path, metadata={"round": round_})
        assert inspect_session(path).metadata == {"round": round_}
        new = sorted(
            set(os.listdir(out)) - {path.name} - {name for names in strays.values() for name in names}
        )
        if new:
            strays[round_] = new
    # The kills were timed to land inside save_session: at least one of them did.
    assert killed_mid_save >= 1
    # A writer killed between linking its temporary file and renaming it (a window of microseconds) leaves
    # a `.story.session.XXXXXX` behind; it never collides with a later save (random, exclusive names), and
    # the next save after it went stale (2 s) removes it. Nothing else is ever left.
    assert all(
        re.fullmatch(r"\.story\.session\.[A-Za-z0-9]{6}", name) for names in strays.values() for name in names
    ), strays
    time.sleep(2.2)
    checker.save_session(path)
    assert os.listdir(out) == [path.name]


def test_a_writer_killed_at_the_final_rename_keeps_the_old_file_and_its_leftover_is_cleared(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path, seed: Seed
) -> None:
    """Deterministic: strace kills the writer when it enters the rename of its second save (the first one is
    version A), i.e. after the new version is written, fsynced and linked, before it replaces version A.
    Skipped without strace or ptrace on a developer's machine; in CI (which installs strace) it fails."""
    strace = require_tool("strace", "it kills the writer at an exact system call")
    out = tmp_path / "out"
    out.mkdir()
    path = out / "story.session"
    log = tmp_path / "writer.log"
    inject = "rename,renameat,renameat2"
    prefix = (strace, "-f", "-qq", "-o", str(tmp_path / "trace"), "-e", f"trace={inject},linkat")
    writer = start_writer(
        model_path, seed, path, log, (*prefix, "-e", f"inject={inject}:signal=SIGKILL:when=2")
    )
    try:
        output, _ = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    if "ready" not in output and "ptrace" in log.read_text():
        fail_in_ci_or_skip(f"strace cannot trace here: {log.read_text()[-300:]}")
    assert output.split() == ["ready", "saving"], (output, log.read_text())
    assert writer.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), log.read_text()

    # The session is version A, whole: the seed's tokens and state, byte for byte.
    checker = Context(model, **WRITER_PARAMS)  # type: ignore[arg-type]
    assert check_survivor(checker, seed, path) == seed.reference[: seed.held]
    assert state_of(path.read_bytes()) == state_of(seed.path.read_bytes())
    checker.save_session(path, metadata={"after": "kill"})
    assert inspect_session(path).metadata == {"after": "kill"}
    # The killed writer's linked temporary file is the one leftover; a save once it is stale removes it.
    trace = (tmp_path / "trace").read_text()
    [leftover] = sorted(set(os.listdir(out)) - {path.name})
    assert re.fullmatch(r"\.story\.session\.[A-Za-z0-9]{6}", leftover), trace
    time.sleep(2.2)
    checker.save_session(path, metadata={"after": "cleanup"})
    assert sorted(os.listdir(out)) == [path.name], f"left behind after a kill at the rename:\n{trace}"


# ---------------------------------------------------------------------------------------------------------
# Sequences

SEQ_PARAMS = {"n_ctx": 1536, "n_batch": 64, "n_seq_max": 3}


def test_a_sequence_moves_to_another_sequence_of_another_context(
    model: Model, tmp_path: pathlib.Path
) -> None:
    source = Context(model, **SEQ_PARAMS)  # type: ignore[arg-type]
    greedy(source, OTHER, 3, seq=0)
    greedy(source, SYSTEM, 2, seq=1)
    saved = source.sequence_tokens(1)
    data = source.snapshot(seq=1)
    path = tmp_path / "seq1.session"
    info = source.save_session(path, seq=1)
    assert info.sequences == {1: saved} and inspect_session(data).sequences == {1: saved}
    expected = greedy(source, STORY, 12, seq=1)
    expected_tokens = source.sequence_tokens(1)

    ctx = Context(model, **SEQ_PARAMS)  # type: ignore[arg-type]
    ctx.restore(data, seq=0)
    ctx.load_session(path, seq=2)
    assert ctx.tokens == saved and ctx.sequence_tokens(2) == saved
    assert ctx.sequence_tokens(1) == [] and ctx.token_count(1) == 0
    assert_same_output(greedy(ctx, STORY, 12, seq=0), expected)
    assert ctx.tokens == expected_tokens
    assert ctx.sequence_tokens(2) == saved
    assert_same_output(greedy(ctx, STORY, 12, seq=2), expected)
    assert ctx.sequence_tokens(2) == expected_tokens
    assert ctx.tokens == expected_tokens


def test_copy_sequence_gives_an_independent_copy(model: Model) -> None:
    reference = Context(model, **SEQ_PARAMS)  # type: ignore[arg-type]
    greedy(reference, SYSTEM, 0, seq=1)
    expected = greedy(reference, STORY, 12, seq=1)
    expected_tokens = reference.sequence_tokens(1)

    ctx = Context(model, **SEQ_PARAMS)  # type: ignore[arg-type]
    greedy(ctx, SYSTEM, 0, seq=1)
    prefix = ctx.sequence_tokens(1)
    greedy(ctx, OTHER, 2, seq=2)
    ctx.copy_sequence(1, 2)
    assert ctx.sequence_tokens(2) == prefix and ctx.token_count(2) == len(prefix)
    # A snapshot right after the copy holds the copied rows (not stale ones): what encoding the prefix on
    # sequence 2 itself leaves there.
    direct = Context(model, **SEQ_PARAMS)  # type: ignore[arg-type]
    greedy(direct, SYSTEM, 0, seq=2)
    assert state_of(ctx.snapshot(seq=2)) == state_of(direct.snapshot(seq=2))
    assert_same_output(greedy(ctx, STORY, 12, seq=2), expected)
    assert ctx.sequence_tokens(2) == expected_tokens
    assert ctx.sequence_tokens(1) == prefix
    assert_same_output(greedy(ctx, STORY, 12, seq=1), expected)
    assert ctx.sequence_tokens(1) == expected_tokens
    assert ctx.sequence_tokens(2) == expected_tokens
    assert ctx.tokens == []


def test_whole_multi_sequence_snapshots(model: Model) -> None:
    ctx = Context(model, **SEQ_PARAMS)  # type: ignore[arg-type]
    greedy(ctx, SYSTEM, 2, seq=0)
    greedy(ctx, OTHER, 3, seq=2)
    whole = ctx.snapshot()
    assert inspect_session(whole).sequences == {0: ctx.tokens, 2: ctx.sequence_tokens(2)}

    target, twin = Context(model, **SEQ_PARAMS), Context(model, **SEQ_PARAMS)  # type: ignore[arg-type]
    for c in (target, twin):
        greedy(c, STORY, 2, seq=0)
    state = kv_state(target)
    with pytest.raises(InvalidParameterError, match="seq"):
        target.restore(whole, seq=0)
    assert target.tokens == twin.tokens and kv_state(target) == state
    assert_unchanged(target, twin)

    # Restored whole, each sequence comes back in its place and the others are emptied.
    greedy(target, OTHER, 1, seq=1)
    target.restore(whole)
    assert [target.sequence_tokens(s) for s in range(3)] == [ctx.sequence_tokens(s) for s in range(3)]
    assert_same_output(greedy(target, STORY, 8, seq=2), greedy(ctx, STORY, 8, seq=2))
    assert_same_output(greedy(target, STORY, 8, seq=0), greedy(ctx, STORY, 8, seq=0))


def test_sequence_ids_out_of_range_are_invalid(model: Model, tmp_path: pathlib.Path) -> None:
    ctx = Context(model, **SEQ_PARAMS)  # type: ignore[arg-type]
    greedy(ctx, SYSTEM, 0, seq=0)
    path = tmp_path / "seq.session"
    ctx.save_session(path, seq=0)
    data = ctx.snapshot(seq=0)
    single = prepared(model)
    calls: list[Callable[[], object]] = []
    for bad in (3, 7, -1):
        calls += [
            lambda bad=bad: ctx.generate("x", max_tokens=1, seq=bad),  # type: ignore[misc]
            lambda bad=bad: ctx.token_count(bad),  # type: ignore[misc]
            lambda bad=bad: ctx.sequence_tokens(bad),  # type: ignore[misc]
            lambda bad=bad: ctx.truncate(0, seq=bad),  # type: ignore[misc]
            lambda bad=bad: ctx.snapshot(seq=bad),  # type: ignore[misc]
            lambda bad=bad: ctx.save_session(tmp_path / "bad.session", seq=bad),  # type: ignore[misc]
            lambda bad=bad: ctx.restore(data, seq=bad),  # type: ignore[misc]
            lambda bad=bad: ctx.load_session(path, seq=bad),  # type: ignore[misc]
            lambda bad=bad: ctx.copy_sequence(0, bad),  # type: ignore[misc]
            lambda bad=bad: ctx.copy_sequence(bad, 0),  # type: ignore[misc]
        ]
    calls += [lambda: single.restore(data, seq=1), lambda: single.load_session(path, seq=1)]
    tokens, single_tokens = ctx.tokens, single.tokens
    for call in calls:
        with pytest.raises(InvalidParameterError, match="seq"):
            call()
    assert ctx.tokens == tokens and single.tokens == single_tokens
    assert not (tmp_path / "bad.session").exists()


# ---------------------------------------------------------------------------------------------------------
# llama.cpp's own session files


def test_llama_cpp_session_files_load_with_one_warning(model: Model, tmp_path: pathlib.Path) -> None:
    ctx = prepared(model, SYSTEM, 3)
    saved = ctx.tokens
    path = tmp_path / "prompt-cache.bin"
    info = ctx.save_session(path, format="llama.cpp")
    expected = greedy(ctx, STORY, 12)
    expected_tokens = ctx.tokens

    content = path.read_bytes()
    header = LLAMA_CPP_MAGIC + struct.pack(f"<II{len(saved)}i", LLAMA_CPP_VERSION, len(saved), *saved)
    assert content[: len(header)] == header
    for described in (info, inspect_session(path)):
        assert described.format == "llama.cpp" and described.format_version == LLAMA_CPP_VERSION
        assert described.sequences == {0: saved} and described.token_count == len(saved)
        assert described.header_bytes == len(header)
        assert described.total_bytes == len(content)
        assert described.state_bytes == len(content) - len(header)
        assert described.params is None and described.created_at is None
        assert described.model_fingerprint is None

    fresh = Context(model, **SMALL)  # type: ignore[arg-type]
    with pytest.warns(SessionInteropWarning) as record:
        loaded = fresh.load_session(path)
    assert len(record) == 1 and record[0].category is SessionInteropWarning
    assert "llama.cpp" in str(record[0].message)
    assert loaded.format == "llama.cpp" and loaded.sequences == {0: saved}
    assert fresh.tokens == saved
    assert_same_output(greedy(fresh, STORY, 12), expected)
    assert fresh.tokens == expected_tokens

    # It records no parameters: from_session cannot use it.
    with pytest.raises(InvalidParameterError):
        Context.from_session(model, path)


@pytest.mark.parametrize("held", [False, True], ids=["empty", "holding-tokens"])
def test_a_truncated_llama_cpp_file_is_corrupt_and_changes_nothing(
    model: Model, tmp_path: pathlib.Path, held: bool
) -> None:
    source = prepared(model, SYSTEM, 3)
    n = source.token_count()
    path = tmp_path / "prompt-cache.bin"
    source.save_session(path, format="llama.cpp")
    content = path.read_bytes()
    header_len = 12 + 4 * n
    cuts = [0, 2, 6, 11, 12, 14, header_len - 1, header_len, header_len + 1, header_len + 40]
    cuts += [header_len + 1000, len(content) // 2, len(content) - 100, len(content) - 1]

    if held:
        ctx, twin = prepared(model, OTHER, 4), prepared(model, OTHER, 4)
    else:
        ctx, twin = Context(model, **SMALL), Context(model, **SMALL)  # type: ignore[arg-type]
    tokens, state = ctx.tokens, kv_state(ctx)
    damaged = tmp_path / "damaged.bin"
    for cut in cuts:
        damaged.write_bytes(content[:cut])
        with pytest.raises(SessionCorruptError) as excinfo:
            ctx.load_session(damaged)
        assert type(excinfo.value) is SessionCorruptError, cut
        assert ctx.tokens == tokens and kv_state(ctx) == state, cut
    assert_unchanged(ctx, twin)


# ---------------------------------------------------------------------------------------------------------
# Size of the saved state


@pytest.mark.parametrize(
    ("kv", "flash_attn", "row_bytes"),
    [
        ("f16", False, 192 * 2),
        ("f16", True, 192 * 2),
        ("q8_0", True, 192 // 32 * 34),
        ("q4_0", True, 192 // 32 * 18),
    ],
)
def test_state_bytes_are_proportional_to_the_tokens_held(
    model: Model, tmp_path: pathlib.Path, kv: str, flash_attn: bool, row_bytes: int
) -> None:
    n_head = int(model.metadata["llama.attention.head_count"])
    n_head_kv = int(model.metadata["llama.attention.head_count_kv"])
    assert (model.n_layer, model.n_embd // n_head * n_head_kv) == (30, 192)
    kv_per_token = model.n_layer * 2 * row_bytes  # one K row and one V row per layer
    counts = (30, 18, 6, 1)
    sizes: dict[tuple[int, int], int] = {}
    for n_ctx in (512, 2048):
        ctx = Context(model, n_ctx=n_ctx, n_batch=64, type_k=kv, type_v=kv, flash_attn=flash_attn)  # type: ignore[arg-type]
        greedy(ctx, SYSTEM + STORY, 0)
        for n in counts:
            ctx.truncate(n)
            path = tmp_path / f"{n_ctx}-{n}.session"
            info = ctx.save_session(path)
            assert info.token_count == n
            assert info.state_bytes == inspect_session(ctx.snapshot()).state_bytes
            assert info.total_bytes == path.stat().st_size
            assert info.total_bytes == PRELUDE_LEN + info.header_bytes + info.state_bytes + CHECKSUM_LEN
            sizes[n_ctx, n] = info.state_bytes
    slope, remainder = divmod(sizes[512, 30] - sizes[512, 6], 30 - 6)
    assert remainder == 0
    per_cell_metadata = slope - kv_per_token
    assert 8 <= per_cell_metadata <= 12, (slope, kv_per_token)
    constant = sizes[512, 1] - slope
    assert 0 <= constant < 1024
    for n in counts:
        assert sizes[512, n] == constant + n * slope
        assert sizes[2048, n] == sizes[512, n]  # no padding to n_ctx
