"""Hostile files and resource limits, on the real model: what a checksum cannot stop, the state checks and
signatures do; lengths a file announces never size an allocation; OS errors are typed and lose nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest
import xxhash

from llama_sessions import (
    Context,
    InvalidParameterError,
    LlamaSessionsError,
    Model,
    SessionCorruptError,
    SessionSignatureError,
    StorageError,
    inspect_session,
)
from llama_sessions.errors import StorageNotFoundError, StoragePermissionError

PROMPT = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
MORE = "<|im_start|>user\nAnd three animals?<|im_end|>\n<|im_start|>assistant\n"
SMALL = {"n_ctx": 256, "n_batch": 64}
KEY = b"a secret of at least sixteen bytes"


def prepared(model: Model, n: int = 4, **params: object) -> Context:
    ctx = Context(model, **{**SMALL, **params})  # type: ignore[arg-type]
    assert ctx.generate(PROMPT, max_tokens=n, temperature=0) != "" or n == 0
    return ctx


def answer(ctx: Context) -> str:
    text = ctx.generate(MORE, max_tokens=6, temperature=0)
    assert text != ""
    return text


def state_start(data: bytes) -> int:
    """Offset of the first sequence's llama.cpp state in a session: after the 32-byte prelude and header."""
    (header_len,) = struct.unpack_from("<I", data, 12)
    return 32 + header_len


def reseal(data: bytearray) -> bytes:
    """Recomputes the checksum after an edit, as anyone who can write the file can."""
    data[-16:] = xxhash.xxh3_128_intdigest(bytes(data[:-16])).to_bytes(16, "little")
    return bytes(data)


def forged(data: bytes, edits: dict[int, int]) -> bytes:
    """`data` with the i32 at each state offset replaced, checksum recomputed."""
    out = bytearray(data)
    start = state_start(data)
    for offset, value in edits.items():
        struct.pack_into("<i", out, start + offset, value)
    return reseal(out)


# In a one-sequence state: magic, sequence id, stream count, cell count (16 bytes), then 12 bytes per cell:
# position, sequence-id count, sequence id.
def cell(i: int) -> int:
    return 16 + 12 * i


FORGERIES = {
    "a cell at position -5": ({cell(0): -5}, "cell 0 is at position -5, expected 0"),
    "cells out of order": ({cell(1): 2, cell(2): 1}, "cell 1 is at position 2, expected 1"),
    "a cell past the tokens": ({cell(3): 40}, "cell 3 is at position 40, expected 3"),
    "a cell with two sequence ids": ({cell(2) + 4: 2}, "cell 2 belongs to 2 sequences, expected exactly 1"),
    "a cell of another sequence": ({cell(2) + 8: 3}, "cell 2 belongs to sequence 3, expected sequence 0"),
}


@pytest.mark.parametrize("what", sorted(FORGERIES))
def test_forged_cell_records_with_a_valid_checksum_are_corrupt_and_change_nothing(
    model: Model, tmp_path: pathlib.Path, what: str
) -> None:
    edits, reason = FORGERIES[what]
    data = forged(prepared(model).snapshot(), edits)
    path = tmp_path / "forged.session"
    path.write_bytes(data)
    target, twin = prepared(model), prepared(model)
    before = target.tokens
    for load in (lambda: target.restore(data), lambda: target.load_session(path)):
        with pytest.raises(SessionCorruptError) as raised:
            load()
        assert type(raised.value) is SessionCorruptError
        assert f"llama.cpp's state of sequence 0: {reason}" in str(raised.value)
        assert target.tokens == before
    with pytest.raises(SessionCorruptError):
        Context.from_session(model, path)
    assert answer(target) == answer(twin)


def test_reset_leaves_nothing_that_later_decodes_attend_to(model: Model) -> None:
    # A context that held a session, reset, must answer as a fresh one.
    ctx = prepared(model)
    ctx.restore(prepared(model, n=12).snapshot())
    ctx.reset()
    assert ctx.token_count() == 0
    fresh = Context(model, **SMALL)  # type: ignore[arg-type]
    assert ctx.generate(MORE, max_tokens=6, temperature=0) == fresh.generate(
        MORE, max_tokens=6, temperature=0
    )


def llama_cpp_file(model: Model, tmp_path: pathlib.Path) -> tuple[pathlib.Path, bytes, Context]:
    ctx = prepared(model)
    path = tmp_path / "llama.bin"
    ctx.save_session(path, format="llama.cpp")
    return path, path.read_bytes(), ctx


def test_a_llama_cpp_file_claiming_two_billion_tokens_is_corrupt_without_allocating_them(
    model: Model, tmp_path: pathlib.Path
) -> None:
    _, data, ctx = llama_cpp_file(model, tmp_path)
    huge = tmp_path / "huge.bin"
    huge.write_bytes(data[:8] + struct.pack("<I", 2**31) + data[12:])
    before = ctx.tokens
    with pytest.raises(SessionCorruptError, match="truncated: it lists 2147483648 tokens"):
        ctx.load_session(huge)
    with pytest.raises(SessionCorruptError, match="truncated: it lists 2147483648 tokens"):
        inspect_session(huge)
    assert ctx.tokens == before


def test_a_llama_cpp_file_with_a_forged_position_is_corrupt_and_changes_nothing(
    model: Model, tmp_path: pathlib.Path
) -> None:
    _, data, _ = llama_cpp_file(model, tmp_path)
    (n_tokens,) = struct.unpack_from("<I", data, 8)
    arch = b"llama"
    # Header, token list, architecture name, stream count, cell count, then the cells.
    first_cell = 12 + 4 * n_tokens + 4 + len(arch) + 4 + 4
    assert data[12 + 4 * n_tokens + 4 : 12 + 4 * n_tokens + 4 + len(arch)] == arch
    for position in (2**30, -5):
        out = bytearray(data)
        struct.pack_into("<i", out, first_cell, position)
        (tmp_path / "forged.bin").write_bytes(bytes(out))
        target, twin = prepared(model), prepared(model)
        with pytest.raises(SessionCorruptError, match=f"cell 0 is at position {position}, expected 0"):
            target.load_session(tmp_path / "forged.bin")
        assert answer(target) == answer(twin)


def test_a_header_length_beyond_the_format_limit_is_corrupt(model: Model, tmp_path: pathlib.Path) -> None:
    data = bytearray(prepared(model).snapshot())
    struct.pack_into("<I", data, 12, 2**31)
    data[24:32] = xxhash.xxh3_64_intdigest(bytes(data[:24])).to_bytes(8, "little")
    path = tmp_path / "long-header.session"
    path.write_bytes(bytes(data))
    for call in (lambda: inspect_session(path), lambda: inspect_session(bytes(data))):
        with pytest.raises(
            SessionCorruptError, match="announces a 2147483648-byte header, the format allows at most"
        ):
            call()


def test_thread_counts_beyond_llama_cpp_s_limit_are_invalid(model: Model) -> None:
    with pytest.raises(InvalidParameterError, match=r"^invalid n_threads: expected 1 <= n_threads <= 512"):
        Context(model, n_threads=10**7, **SMALL)  # type: ignore[arg-type]


def test_signed_sessions_load_with_their_key_only(model: Model, tmp_path: pathlib.Path) -> None:
    source = prepared(model)
    path = tmp_path / "signed.session"
    info = source.save_session(path, secret_key=KEY)
    assert info.signed
    assert inspect_session(path).signed
    assert inspect_session(path, secret_key=KEY).signed
    expected = answer(prepared(model))

    fresh = Context(model, **SMALL)  # type: ignore[arg-type]
    fresh.load_session(path, secret_key=KEY)
    assert answer(fresh) == expected
    assert answer(Context.from_session(model, path, secret_key=KEY)) == expected

    unsigned = source.snapshot()
    data = path.read_bytes()
    modified = bytearray(data)
    modified[state_start(data) + 200] ^= 1
    cases = {
        "no key": (lambda c: c.load_session(path), "it is signed: pass the secret_key"),
        "another key": (
            lambda c: c.load_session(path, secret_key=b"another secret, as long"),
            "does not match",
        ),
        "an unsigned session": (lambda c: c.restore(unsigned, secret_key=KEY), "it is not signed"),
        "a modified session": (lambda c: c.restore(bytes(modified), secret_key=KEY), "does not match"),
        "from_session without a key": (lambda c: Context.from_session(model, path), "it is signed"),
    }
    for what, (load, reason) in cases.items():
        target = Context(model, **SMALL)  # type: ignore[arg-type]
        with pytest.raises(SessionSignatureError, match=reason):
            load(target)
        assert target.token_count() == 0, what

    snapshot = source.snapshot(secret_key=KEY)
    target = Context(model, **SMALL)  # type: ignore[arg-type]
    target.restore(snapshot, secret_key=KEY)
    assert target.tokens == source.tokens
    assert inspect_session(snapshot).signed
    with pytest.raises(InvalidParameterError, match=r"^invalid secret_key: expected at least 16 bytes"):
        source.snapshot(secret_key=b"short")
    with pytest.raises(TypeError):
        source.snapshot(secret_key="a str is not bytes")  # type: ignore[arg-type]


def test_a_missing_file_is_a_storage_error_with_errno_and_filename(
    model: Model, tmp_path: pathlib.Path
) -> None:
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    missing = tmp_path / "missing.session"
    with pytest.raises(StorageNotFoundError) as raised:
        ctx.load_session(missing)
    error = raised.value
    assert isinstance(error, FileNotFoundError)
    assert isinstance(error, StorageError)
    assert isinstance(error, LlamaSessionsError)
    assert (error.errno, error.filename) == (errno.ENOENT, str(missing))
    assert str(error) == f"[Errno 2] cannot open: No such file or directory: '{missing}'"
    with pytest.raises(IsADirectoryError):
        ctx.load_session(tmp_path)


@contextlib.contextmanager
def small_filesystem(path: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    """A tmpfs of `size` mounted at `path` (root only; CI runs as root)."""
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("mounting a small filesystem needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_disk_keeps_the_old_file_and_raises_a_storage_error(
    model: Model, tmp_path: pathlib.Path
) -> None:
    with small_filesystem(tmp_path / "disk", "256k") as disk:
        small = Context(model, **SMALL)  # type: ignore[arg-type]
        small.generate("Hi", max_tokens=0)
        path = disk / "s.session"
        small.save_session(path)
        old = path.read_bytes()
        big = prepared(model, n=0)
        assert big.token_count() * 23_000 > 256 << 10  # f16 KV rows of SmolLM2: 23 kB per token
        with pytest.raises(StorageError) as raised:
            big.save_session(path)
        assert raised.value.errno == errno.ENOSPC
        assert raised.value.filename == str(path)
        assert isinstance(raised.value, OSError)
        assert path.read_bytes() == old
        assert sorted(p.name for p in disk.iterdir()) == ["s.session"]
        Context(model, **SMALL).load_session(path)  # type: ignore[arg-type]


def test_a_read_only_directory_is_a_permission_error(model: Model, tmp_path: pathlib.Path) -> None:
    with small_filesystem(tmp_path / "ro", "1m") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        ctx = prepared(model, n=0)
        with pytest.raises(StoragePermissionError) as raised:
            ctx.save_session(ro / "s.session")
        assert isinstance(raised.value, PermissionError)
        assert raised.value.errno == errno.EROFS


def test_a_context_larger_than_the_memory_can_give_is_a_clear_error(model_path: pathlib.Path) -> None:
    # 1.5 GiB of address space holds the model but not a KV cache of n_ctx=8192 x 64 sequences' buffers.
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))\n"
        "from llama_sessions import Context, ContextCreateError, Model\n"
        f"model = Model.load({str(model_path)!r})\n"
        "try:\n"
        "    Context(model, n_ctx=8192, n_batch=8192, n_seq_max=64)\n"
        "except ContextCreateError as e:\n"
        "    print('ContextCreateError:', e)\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout.startswith("ContextCreateError: cannot create context: "), result.stdout


def test_the_log_switch_is_read_once_when_the_backend_starts(model_path: pathlib.Path) -> None:
    # llama.cpp logs from its own threads; reading the environment there would race with Python writing it,
    # so LLAMA_SESSIONS_LOG is read once, when the first model loads.
    script = (
        "import os, sys\n"
        "from llama_sessions import Context, Model\n"
        f"model = Model.load({str(model_path)!r})\n"
        "if sys.argv[1] == 'late':\n"
        "    os.environ['LLAMA_SESSIONS_LOG'] = '1'\n"
        "Context(model, n_ctx=256)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_SESSIONS_LOG"}
    late = subprocess.run(
        [sys.executable, "-c", script, "late"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert "llama_context" not in late.stderr, late.stderr[-1000:]
    early = subprocess.run(
        [sys.executable, "-c", script, "early"],
        capture_output=True,
        text=True,
        env={**env, "LLAMA_SESSIONS_LOG": "1"},
        timeout=120,
        check=True,
    )
    assert "llama_context" in early.stderr


def test_a_manager_with_a_secret_key_signs_what_it_writes_and_loads_only_that(
    model: Model, tmp_path: pathlib.Path
) -> None:
    from llama_sessions import SessionManager

    signed = SessionManager(model, tmp_path, n_ctx=256, autosave=True, secret_key=KEY)
    signed.create_session("ada")
    answer = signed.chat("ada", "Name a colour.", 4, temperature=0)
    assert answer != ""
    signed.checkpoint("ada", "one")
    assert inspect_session(signed.session_path("ada")).signed
    assert inspect_session(tmp_path / "ada@one.session").signed
    # Another manager on the same directory: with the key it resumes; without, or with another, it refuses.
    again = SessionManager(model, tmp_path, n_ctx=256, secret_key=KEY)
    assert [m["content"] for m in again.history("ada")] == ["Name a colour.", answer]
    again.revert("ada", "one")
    for other in (None, b"another secret, as long"):
        with pytest.raises(SessionSignatureError):
            SessionManager(model, tmp_path, n_ctx=256, secret_key=other).load("ada")
    # An unsigned session planted in the directory is refused by the signing manager.
    plain = SessionManager(model, tmp_path / "plain", n_ctx=256, autosave=True)
    plain.create_session("bob")
    plain.chat("bob", "Hi", 2, temperature=0)
    (tmp_path / "bob.session").write_bytes(plain.session_path("bob").read_bytes())
    with pytest.raises(SessionSignatureError, match="it is not signed"):
        again.load("bob")
