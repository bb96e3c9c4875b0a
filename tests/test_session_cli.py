"""`llama-sessions inspect`, `verify` and the demo's save/restore, run as a user runs them."""

from __future__ import annotations

import json
import pathlib
import re

from llama_sessions import Context, Model

from conftest import SMALL, SYSTEM, run_cli


def saved_session(model: Model, tmp_path: pathlib.Path) -> tuple[pathlib.Path, Context]:
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    ctx.generate(SYSTEM, max_tokens=0)
    path = tmp_path / "s.session"
    ctx.save_session(path, metadata={"user": "ada", "turns": [1, 2]})
    return path, ctx


def test_inspect_shows_the_header(model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    path, ctx = saved_session(model, tmp_path)
    result = run_cli("inspect", str(path), model_path=model_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "format        llama-sessions version 1" in out
    assert f"fingerprint {model.fingerprint}" in out
    assert "n_ctx=512 n_batch=64 type_k=f16 type_v=f16 flash_attn=False n_seq_max=1" in out
    assert f"sequence 0    {ctx.token_count()} tokens" in out
    assert f"{path.stat().st_size:,} bytes" in out
    assert 'metadata      {"turns": [1, 2], "user": "ada"}' in out


def test_inspect_json_and_text(model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    path, ctx = saved_session(model, tmp_path)
    result = run_cli("inspect", str(path), "--json", model_path=model_path)
    assert result.returncode == 0, result.stderr
    header = json.loads(result.stdout)  # the header as stored (tests/test_cli_existing_sessions.py)
    assert header["sequences"][0]["tokens"] == ctx.tokens
    assert header["model"]["fingerprint"] == model.fingerprint
    assert header["metadata"] == {"user": "ada", "turns": [1, 2]}
    text = run_cli("inspect", str(path), "--text", model_path=model_path)
    assert text.returncode == 0, text.stderr
    assert text.stdout.endswith("--- sequence 0 ---\n" + model.detokenize(ctx.tokens, special=True) + "\n")


def test_inspect_text_refuses_another_model(
    model: Model, variant_model_path: pathlib.Path, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    path, _ = saved_session(model, tmp_path)
    result = run_cli(
        "inspect", str(path), "--text", "--model", str(variant_model_path), model_path=model_path
    )
    assert result.returncode == 2
    assert "pass its model with --model" in result.stderr


def test_verify_exits_zero_for_an_intact_loadable_file(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    path, ctx = saved_session(model, tmp_path)
    intact = run_cli("verify", str(path), model_path=model_path)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.strip() == f"OK: {path} is intact ({ctx.token_count()} tokens)"
    loadable = run_cli("verify", str(path), "--model", str(model_path), model_path=model_path)
    assert loadable.returncode == 0, loadable.stderr
    assert loadable.stdout.strip() == f"OK: {path} loads with {model_path.name} ({ctx.token_count()} tokens)"


def test_verify_exits_non_zero_with_the_reason(
    model: Model, variant_model_path: pathlib.Path, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    path, _ = saved_session(model, tmp_path)
    other = run_cli("verify", str(path), "--model", str(variant_model_path), model_path=model_path)
    assert other.returncode == 1
    assert other.stderr.startswith("llama-sessions: SessionModelMismatchError: ")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped = tmp_path / "flipped.session"
    flipped.write_bytes(bytes(data))
    corrupt = run_cli("verify", str(flipped), model_path=model_path)
    assert corrupt.returncode == 1
    assert corrupt.stderr.startswith("llama-sessions: SessionCorruptError: ")
    assert "checksum mismatch" in corrupt.stderr
    missing = run_cli("verify", str(tmp_path / "missing.session"), model_path=model_path)
    assert missing.returncode == 1
    assert missing.stderr.startswith("llama-sessions: StorageNotFoundError: [Errno 2] cannot open: ")
    assert "Traceback" not in corrupt.stderr + other.stderr + missing.stderr


def test_verify_and_inspect_read_llama_cpp_files(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    ctx.generate(SYSTEM, max_tokens=0)
    path = tmp_path / "prompt.cache"
    ctx.save_session(path, format="llama.cpp")
    shown = run_cli("inspect", str(path), model_path=model_path)
    assert shown.returncode == 0, shown.stderr
    assert "format        llama.cpp version 11" in shown.stdout
    loaded = run_cli("verify", str(path), "--model", str(model_path), model_path=model_path)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stderr.startswith("llama-sessions: warning: SessionInteropWarning: ")


def test_demo_restores_the_system_prompt_faster_than_it_prefills(model_path: pathlib.Path) -> None:
    result = run_cli("demo", "--max-tokens", "4", model_path=model_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    prefill = next(line for line in lines if line.startswith("prefill "))
    restore = next(line for line in lines if line.startswith("restore "))
    # The file is deleted when the demo ends: the demo does not name it as if it could be looked at.
    assert re.fullmatch(
        r"save +[0-9.]+ MB to a temporary file in [0-9.]+ ms",
        next(line for line in lines if line.startswith("save ")),
    )
    assert ".session" not in result.stdout
    assert "tokens/s" in prefill
    assert any(line.startswith("generate ") and "tokens/s" in line for line in lines)
    assert any(line.startswith("assistant ") for line in lines)
    prefill_tokens = int(prefill.split()[1])
    assert restore.startswith(f"restore   {prefill_tokens} tokens into a fresh context in ")
    # The demo's point: restoring the encoded system prompt beats decoding it again by far (a hundredfold and
    # more); "slower" or a small factor means the restore is broken, not that the machine is busy.
    compared = re.search(r" in [0-9.]+ ms: ([0-9.]+)x (faster|slower) than the prefill$", restore)
    assert compared is not None, restore
    assert compared[2] == "faster" and float(compared[1]) >= 2, restore


def test_inspect_and_verify_signed_sessions_with_a_key_file(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"a secret of at least sixteen bytes")
    path = tmp_path / "signed.session"
    ctx = Context(model, n_ctx=256)
    ctx.generate("Hello", max_tokens=0)
    ctx.save_session(path, secret_key=key.read_bytes())
    shown = run_cli("inspect", str(path), model_path=model_path)
    assert shown.returncode == 0 and "signed        yes (keyed BLAKE3)" in shown.stdout
    unkeyed = run_cli("verify", str(path), model_path=model_path)
    assert unkeyed.stdout.startswith(f"OK: {path} is intact (signed: pass --key-file to check it)")
    keyed = run_cli(
        "verify", str(path), "--key-file", str(key), "--model", str(model_path), model_path=model_path
    )
    assert keyed.returncode == 0 and keyed.stdout.startswith(f"OK: {path} loads with"), keyed.stderr
    refused = run_cli("verify", str(path), "--model", str(model_path), model_path=model_path)
    assert refused.returncode == 1
    assert refused.stderr.startswith("llama-sessions: SessionSignatureError: "), refused.stderr


def test_version_names_the_library_and_the_llama_cpp_build(model_path: pathlib.Path) -> None:
    from llama_sessions import __version__
    from llama_sessions._native import LLAMA_CPP_BUILD

    result = run_cli("--version", model_path=model_path)
    assert result.returncode == 0
    assert result.stdout == f"llama-sessions {__version__} (llama.cpp from {LLAMA_CPP_BUILD})\n"
