"""The ``llama-sessions`` command line.

``llama-sessions demo`` runs the main job on the default model: encode a long system prompt, save it, load it
into a fresh context and answer, printing the prefill time against the restore time.
``llama-sessions inspect FILE`` shows what a session holds; ``llama-sessions verify FILE [--model PATH]``
checks that it is intact (and loadable with that model). ``llama-sessions chat`` is a chat that persists in a
session, ``llama-sessions sessions`` lists, shows and deletes them. ``llama-sessions fetch-model`` only puts
the default model in the cache and prints its path.

Options are checked before anything is loaded, created or changed; a refused command line exits with 2, a
failure of the command itself with 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ._fetch import cache_dir, default_model_path
from ._native import (
    LLAMA_CPP_BUILD,
    Context,
    ContextParams,
    Model,
    PrefixCache,
    SessionInfo,
    __version__,
    delete_session,
    inspect_session,
    inspect_stored_session,
    list_sessions,
    validate_session_id,
)
from .errors import LlamaSessionsError, SessionNotFoundError, SessionParamsMismatchError
from .manager import SessionManager

#: Where a SessionManager keeps its record (system prompt, history, version) in a session's metadata.
MANAGER_RECORD_KEY = "llama_sessions.manager"
#: The JSON header of a llama-sessions file starts after its 32-byte prelude (docs/session-format.md, "The
#: format"); SessionInfo.header_bytes is its length.
PRELUDE_BYTES = 32

#: A long system prompt, as a real assistant would have: the cost of reading it is what sessions save.
DEMO_SYSTEM_PROMPT = """You are Atlas, the support assistant of a small company that builds weather stations.
Follow these rules in every answer:
1. Be concise: answer in at most three sentences unless the user asks for detail.
2. Be accurate: if you do not know something, say so instead of guessing.
3. Be friendly and professional; never use slang.
4. When the user asks about installation, remind them to mount the station at least two meters above ground,
   away from walls and trees, and to point the solar panel south in the northern hemisphere.
5. When the user asks about batteries, explain that the station uses two AA lithium cells that last about
   two years, and that rechargeable cells are not supported in freezing weather.
6. When the user asks about connectivity, explain that the station talks to its base unit on 868 MHz with a
   range of about 100 meters in the open, and that the base unit joins Wi-Fi on 2.4 GHz only.
7. When the user asks about data, explain that readings are stored for one year on the base unit and can be
   exported as CSV from the web interface.
8. When the user reports a fault, ask for the serial number, the firmware version and a description of the
   problem, and suggest restarting the base unit first.
9. Never promise refunds or replacements; direct those requests to the warranty team.
10. End every answer by asking whether there is anything else you can help with.
Product facts: the Atlas S2 measures temperature, humidity, pressure, wind speed, wind direction and
rainfall. The sensors are calibrated at the factory. Firmware updates install automatically at night.
The web interface runs on the base unit at http://atlas.local and needs no account."""

DEMO_QUESTION = "How high should I mount the station, and which way should the solar panel face?"


def _model_path(given: str | None) -> Path:
    return Path(given) if given else default_model_path(progress=True)


def demo(args: argparse.Namespace) -> int:
    """Encode a long system prompt, save it, load it into a fresh Context, answer, and compare the times."""
    path = _model_path(args.model)
    started = time.perf_counter()
    model = Model.load(path)
    print(f"model     {path.name}  ({model.architecture}, {model.n_layer} layers)")
    print(f"          fingerprint {model.fingerprint}")
    print(f"loaded in {time.perf_counter() - started:.2f} s")
    system = model.apply_chat_template(
        [{"role": "system", "content": DEMO_SYSTEM_PROMPT}], add_generation_prompt=False
    )
    first = Context(model, n_ctx=args.n_ctx)
    first.generate(system, max_tokens=0)
    prefill = first.last_stats
    assert prefill is not None
    print(
        f"prefill   {prefill.prompt_tokens} tokens of system prompt in "
        f"{prefill.prompt_seconds * 1000:.0f} ms "
        f"({prefill.prompt_tokens_per_second:.0f} tokens/s)"
    )
    with tempfile.TemporaryDirectory(prefix="llama-sessions-demo-") as directory:
        session = Path(directory) / "system-prompt.session"
        started = time.perf_counter()
        info = first.save_session(session, metadata={"demo": "system prompt"})
        saved = time.perf_counter() - started
        print(f"save      {info.total_bytes / 1e6:.1f} MB to a temporary file in {saved * 1000:.1f} ms")
        ctx = Context(model, n_ctx=args.n_ctx)
        started = time.perf_counter()
        ctx.load_session(session)
        restored = time.perf_counter() - started
    print(
        f"restore   {ctx.token_count()} tokens into a fresh context in {restored * 1000:.1f} ms: "
        f"{_compared(prefill.prompt_seconds, restored)} than the prefill"
    )
    turn = model.apply_chat_template([{"role": "user", "content": DEMO_QUESTION}])
    print(f"\nuser      {DEMO_QUESTION}\nassistant ", end="", flush=True)
    for piece in ctx.stream(turn, max_tokens=args.max_tokens, temperature=0):
        print(piece, end="", flush=True)
    print()
    answer = ctx.last_stats
    assert answer is not None
    print(
        f"\nquestion  {answer.prompt_tokens} tokens in {answer.prompt_seconds:.2f} s "
        f"({answer.prompt_tokens_per_second:.0f} tokens/s)"
    )
    print(
        f"generate  {answer.generated_tokens} tokens in {answer.generation_seconds:.2f} s "
        f"({answer.generation_tokens_per_second:.1f} tokens/s, stopped by {answer.stop_reason})"
    )
    print(f"context   {ctx.token_count()} of {ctx.n_ctx} tokens held")
    return 0


def _compared(prefill_seconds: float, restore_seconds: float) -> str:
    """How the restore compares with the prefill: "12.5x faster", or "3.0x slower" when it is slower."""
    if restore_seconds <= 0:
        return "immeasurably faster"
    ratio = prefill_seconds / restore_seconds
    if ratio >= 1:
        return f"{ratio:.1f}x faster"
    return f"{1 / ratio:.1f}x slower" if ratio > 0 else "immeasurably slower"


def _format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.1f} {unit})"
    return f"{n:,} bytes"


def _describe(info: SessionInfo, omit_metadata: Sequence[str] = ()) -> list[str]:
    lines = [f"format        {info.format} version {info.format_version}"]
    if info.format == "llama.cpp":
        lines.append("              (no model identity, parameters or checksum are recorded)")
    else:
        lines.append(f"written by    llama-sessions {info.library_version}, llama.cpp {info.llama_cpp_build}")
        created = info.created_at
        lines.append(f"created       {created.isoformat() if created else '-'}")
        lines.append(
            f"model         {info.model_name or info.model_file_name or '-'} "
            f"({info.model_architecture}, file {info.model_file_name or '-'})"
        )
        lines.append(f"              fingerprint {info.model_fingerprint}")
        params = info.params
        if params is not None:
            lines.append(
                f"parameters    n_ctx={params.n_ctx} n_batch={params.n_batch} type_k={params.type_k} "
                f"type_v={params.type_v} flash_attn={params.flash_attn} n_seq_max={params.n_seq_max}"
            )
    for seq, tokens in info.sequences.items():
        lines.append(f"sequence {seq:<4} {len(tokens)} tokens")
    lines.append(f"tokens        {info.token_count}")
    lines.append(
        f"size          {_format_bytes(info.total_bytes)}: header {info.header_bytes:,}, "
        f"state {info.state_bytes:,}"
    )
    if info.format != "llama.cpp":
        lines.append(f"signed        {'yes (keyed BLAKE3)' if info.signed else 'no'}")
        metadata = {key: value for key, value in info.metadata.items() if key not in omit_metadata}
        lines.append(f"metadata      {json.dumps(metadata, ensure_ascii=False, sort_keys=True)}")
    return lines


def _secret_key(args: argparse.Namespace) -> bytes | None:
    """The secret key of signed sessions: the bytes of --key-file, or of $LLAMA_SESSIONS_SECRET_KEY_FILE."""
    path = args.key_file or os.environ.get("LLAMA_SESSIONS_SECRET_KEY_FILE")
    return Path(path).read_bytes() if path else None


def inspect(args: argparse.Namespace) -> int:
    """Print what a session file holds (verifying it), and with --text its tokens as text."""
    key = _secret_key(args)
    info = inspect_session(args.file, secret_key=key)
    if args.json:
        print(json.dumps(_header_json(Path(args.file), info, key), indent=2, ensure_ascii=False))
    else:
        print("\n".join(_describe(info)))
    if args.text:
        model = Model.load(_model_path(args.model))
        if info.model_fingerprint is not None and info.model_fingerprint != model.fingerprint:
            print(
                f"llama-sessions: the session belongs to model {info.model_fingerprint}, "
                f"{model.path.name} is {model.fingerprint}: pass its model with --model",
                file=sys.stderr,
            )
            return 2
        for seq, tokens in info.sequences.items():
            print(f"\n--- sequence {seq} ---")
            print(model.detokenize(tokens, special=True))
    return 0


def _header_json(path: Path, info: SessionInfo, key: bytes | None) -> dict[str, Any]:
    """The header of the session file at ``path`` (``info``), as stored: the JSON object of a llama-sessions
    file (its fields are described in docs/session-format.md), read from bytes verified again as a whole, so
    that it is the header of an intact file even if the file was replaced meanwhile. A llama.cpp file has no
    JSON header: its format, version and tokens, in the same shape."""
    if info.format == "llama.cpp":
        return {
            "format": info.format,
            "format_version": info.format_version,
            "sequences": [
                {"seq": seq, "tokens": tokens, "state_bytes": info.state_bytes}
                for seq, tokens in info.sequences.items()
            ],
        }
    data = path.read_bytes()
    verified = inspect_session(data, secret_key=key)
    header: dict[str, Any] = json.loads(data[PRELUDE_BYTES : PRELUDE_BYTES + verified.header_bytes])
    return header


def verify(args: argparse.Namespace) -> int:
    """Exit 0 when the session is intact (and, with --model, loadable with that model); 1 with the reason."""
    key = _secret_key(args)
    info = inspect_session(args.file, secret_key=key)
    if args.model is None:
        what = "intact" if info.format == "llama-sessions" else "a llama.cpp session with a valid header"
        what += " and signed with this key" if key else " (signed: pass --key-file to check it)" * info.signed
        print(f"OK: {args.file} is {what} ({info.token_count} tokens)")
        return 0
    model = Model.load(args.model)
    if info.format == "llama.cpp":
        # llama.cpp's file records no parameters: try llama.cpp's defaults with room for the tokens.
        n_ctx = min(model.n_ctx_train, max(512, -(-info.token_count // 256) * 256))
        ctx = Context(model, n_ctx=n_ctx)
        ctx.load_session(args.file)
    else:
        ctx = Context.from_session(model, args.file, secret_key=key)
    print(f"OK: {args.file} loads with {Path(args.model).name} ({ctx.token_count()} tokens)")
    return 0


#: The chat options that set a context parameter, by parameter: a session keeps the ones it was created with.
CONTEXT_OPTIONS = {"n_ctx": "--n-ctx"}
#: The context size of a new chat session when --n-ctx is not given.
DEFAULT_CHAT_N_CTX = 4096


def _refuse(message: str) -> int:
    """Reports a command line that cannot be carried out; exit status 2, as for an invalid option."""
    print(f"llama-sessions: {message}", file=sys.stderr)
    return 2


def _system_prompt_refusal(session_id: str, given: str | None, stored: SessionInfo) -> str | None:
    """Why ``--system given`` cannot be applied to the stored session (None: it can, being absent or the
    system prompt the session has)."""
    record = stored.metadata.get(MANAGER_RECORD_KEY)
    has = record.get("system_prompt") if isinstance(record, dict) else None
    if given is None or given == has:
        return None
    what = f"already has a system prompt ({has!r})" if has else "already exists without a system prompt"
    return (
        f"session {session_id!r} {what}; --system applies only when creating a session, and a session keeps "
        f"its system prompt: leave out --system to resume it, or choose another --session"
    )


def _context_option_refusal(
    session_id: str, args: argparse.Namespace, error: SessionParamsMismatchError
) -> str:
    """The mismatch of a stored session with the context options given, said in terms of those options."""
    names = [name for name in CONTEXT_OPTIONS if name in error.mismatches]
    saved = ", ".join(f"{name}={error.mismatches[name][0]}" for name in names)
    given = ", ".join(f"{CONTEXT_OPTIONS[name]} {getattr(args, name)}" for name in names)
    options = " and ".join(CONTEXT_OPTIONS[name] for name in names)
    return (
        f"session {session_id!r} was created with {saved}, not {given}: a session keeps the context "
        f"parameters it was created with; leave out {options} to resume it with them"
    )


#: The help of every option that names where sessions are stored.
STORE_HELP = (
    "session directory, redis://HOST:PORT/DB, rediss://... or s3://BUCKET/PREFIX (default ./sessions; "
    "see docs/deployment.md)"
)


def _is_remote(location: str) -> bool:
    """Whether a session location is a store URL (redis://, s3://...) rather than a directory."""
    return "://" in location and not location.startswith("file://")


def _is_missing_directory(location: str) -> bool:
    """Whether a session location names a directory that does not exist (opening it would create it)."""
    return not _is_remote(location) and not Path(location.removeprefix("file://")).is_dir()


def _stored_or_none(location: str, session_id: str) -> SessionInfo | None:
    """What stored session ``session_id`` holds (its header), or None when there is no such session."""
    try:
        return inspect_stored_session(location, session_id)
    except SessionNotFoundError:
        return None


def chat(args: argparse.Namespace) -> int:
    """An interactive chat whose conversation persists in a session store, resumed when it exists.

    Everything is checked before the model is loaded or anything is written: the id, and for an existing
    session that --system and --n-ctx agree with what it was created with (they apply only when creating)."""
    validate_session_id(args.session)
    stored = _stored_or_none(args.dir, args.session)
    params: ContextParams | None
    if stored is None:
        # Creating the parameters refuses a bad --n-ctx now.
        params = ContextParams(n_ctx=DEFAULT_CHAT_N_CTX if args.n_ctx is None else args.n_ctx)
    else:
        refusal = _system_prompt_refusal(args.session, args.system, stored)
        if refusal is not None:
            return _refuse(refusal)
        # The saved parameters, unless --n-ctx says otherwise: then the load below compares them.
        params = stored.params
        if args.n_ctx is not None:
            params = (params or ContextParams()).replace(n_ctx=args.n_ctx)
    model = Model.load(_model_path(args.model))
    manager = SessionManager(model, args.dir, params, autosave=True)
    started = time.perf_counter()
    if stored is not None:
        try:
            ctx = manager.load(args.session)
        except SessionParamsMismatchError as error:
            if not any(
                getattr(args, name) is not None for name in CONTEXT_OPTIONS if name in error.mismatches
            ):
                raise  # not a matter of the options given
            return _refuse(_context_option_refusal(args.session, args, error))
        turns = len(manager.history(args.session)) // 2
        print(
            f"resumed   {args.session}: {ctx.token_count()} tokens, {turns} turns, in "
            f"{(time.perf_counter() - started) * 1000:.0f} ms",
            file=sys.stderr,
        )
    else:
        ctx = manager.create_session(args.session, args.system)
        print(
            f"created   {args.session} ({ctx.token_count()} tokens of system prompt) in "
            f"{(time.perf_counter() - started) * 1000:.0f} ms",
            file=sys.stderr,
        )
    print("Type a message; an empty line or end of input quits. Every turn is saved.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        if not line.strip():
            break
        print("assistant> ", end="", flush=True)
        for piece in manager.stream_chat(args.session, line, args.max_tokens, temperature=args.temperature):
            print(piece, end="", flush=True)
        print()
    if manager.session_dir is not None:
        print(f"saved     {manager.session_path(args.session)}", file=sys.stderr)
    else:
        print(f"saved     {args.session} in {manager.location}", file=sys.stderr)
    return 0


def export(args: argparse.Namespace) -> int:
    """Write a stored session as one file (the single-file format), opened with its saved parameters."""
    validate_session_id(args.session_id)
    stored = _stored_or_none(args.dir, args.session_id)
    if stored is None:
        raise SessionNotFoundError(f"no session {args.session_id!r} in {args.dir}")
    key = _secret_key(args)
    model = Model.load(_model_path(args.model))
    manager = SessionManager(model, args.dir, stored.params, autosave=False, secret_key=key)
    info = manager.export(args.session_id, args.file)
    print(
        f"exported  {args.session_id}: {info.token_count} tokens, {info.total_bytes:,} bytes to {args.file}"
    )
    return 0


# `cache stats` and `cache clear` must not evict: the cache is opened with no bound unless gc is given one.
_UNBOUNDED = 2**63 - 1


def default_prefix_cache_dir() -> Path:
    """Where ``llama-sessions cache`` looks unless ``--dir`` says otherwise: ``cache_dir()/prefix-cache``."""
    return cache_dir() / "prefix-cache"


def cache(args: argparse.Namespace) -> int:
    """Counts of a prefix-cache directory, its garbage collection, or its removal."""
    directory = Path(args.dir) if args.dir else default_prefix_cache_dir()
    if not directory.is_dir():
        print(f"llama-sessions: no prefix cache directory {directory}", file=sys.stderr)
        return 1
    max_bytes = args.max_bytes if args.action == "gc" and args.max_bytes is not None else _UNBOUNDED
    prefix_cache = PrefixCache(directory, max_bytes=max_bytes)
    # A SessionManager's chunks live in SESSION_DIR/chunks: the chunks its stored sessions name stay.
    sessions_dir = Path(args.sessions) if args.sessions else directory.parent
    named = prefix_cache.pin_sessions(sessions_dir) if sessions_dir.is_dir() else 0
    pinned = f"; {named} chunks named by stored sessions, never evicted" if named else ""
    if args.action == "stats":
        stats = prefix_cache.stats()
        print(f"{directory}: {stats['entries']} chunks, {stats['bytes']:,} bytes")
    elif args.action == "gc":
        report = prefix_cache.gc()
        print(
            f"{directory}: removed {report['removed_corrupt']} corrupt chunks, evicted {report['evicted']}, "
            f"kept {report['kept']} ({report['bytes']:,} bytes{pinned})"
        )
    else:
        print(f"{directory}: removed {prefix_cache.clear()} chunks")
    return 0


def sessions(args: argparse.Namespace) -> int:
    """List, show or delete the sessions in a directory (``list ID``: that session's row only)."""
    if args.session_id is not None:
        validate_session_id(args.session_id)
    if _is_missing_directory(args.dir):
        print(f"llama-sessions: no session directory {args.dir}", file=sys.stderr)
        return 1
    if args.action == "list":
        listed = list_sessions(args.dir)
        if args.session_id is not None:
            listed = [stored for stored in listed if stored.id == args.session_id]
            if not listed:
                raise SessionNotFoundError(f"no session {args.session_id!r} in {args.dir}")
        print(f"{'id':<24} {'tokens':>7} {'messages':>8} {'bytes':>12}  updated")
        for stored in listed:
            if stored.error is not None:
                print(f"{stored.id:<24} unreadable: {stored.error}")
                continue
            updated = stored.updated_at
            print(
                f"{stored.id:<24} {stored.token_count:>7} {stored.message_count:>8} {stored.file_size:>12,}  "
                f"{updated.isoformat(timespec='seconds') if updated else '-'}"
            )
        return 0
    if args.session_id is None:
        return _refuse(f"sessions {args.action} needs a session id")
    if args.action == "show":
        if _is_remote(args.dir):
            # The header alone (a few KiB of the store): a load verifies the rest.
            info = inspect_stored_session(args.dir, args.session_id)
        else:
            path = Path(args.dir.removeprefix("file://")) / f"{args.session_id}.session"
            if not path.is_file():
                raise SessionNotFoundError(f"no session {args.session_id!r} in {args.dir}")
            info = inspect_session(path)
        manager_record = info.metadata.get(MANAGER_RECORD_KEY)
        # The user's metadata is shown with the header, the manager's record (history...) once, below it.
        print("\n".join(_describe(info, omit_metadata=(MANAGER_RECORD_KEY,))))
        if isinstance(manager_record, dict):
            print(f"version       {manager_record.get('version')}")
            if manager_record.get("system_prompt"):
                print(f"system        {manager_record['system_prompt']}")
            for message in manager_record.get("history", []):
                print(f"{message['role']:<13} {message['content']}")
        return 0
    delete_session(args.dir, args.session_id)
    print(f"deleted   {args.session_id}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible server (the ``server`` extra's dependencies are imported only here)."""
    try:
        from .server.run import serve as run_server
    except ImportError as error:
        return _refuse(
            f"serve needs the server extra, which is not installed (no module {error.name!r}): "
            "pip install 'llama-sessions[server]'"
        )
    return run_server(args, _model_path(args.model))


def fetch_model(args: argparse.Namespace) -> int:
    """Put the default model in the cache and print its path."""
    print(default_model_path(progress=True))
    return 0


def _port(text: str) -> int:
    """A TCP port: 1 to 65535."""
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    """An option's value that must be a whole number of at least 1 (argparse reports the error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")
    return value


def _temperature(text: str) -> float:
    """A sampling temperature: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of at least 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-sessions", description="Resumable local LLM inference with llama.cpp."
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"llama-sessions {__version__} (llama.cpp from {LLAMA_CPP_BUILD})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="encode a long system prompt, save and restore it, answer; compare the times"
    )
    demo_parser.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    demo_parser.add_argument("--n-ctx", type=_positive_int, default=4096, help="context size (default 4096)")
    demo_parser.add_argument(
        "--max-tokens", type=_positive_int, default=96, help="most tokens to answer with"
    )
    demo_parser.set_defaults(run=demo)
    inspect_parser = commands.add_parser("inspect", help="show what a session file holds")
    inspect_parser.add_argument("file", help="a session file (llama-sessions or llama.cpp format)")
    inspect_parser.add_argument("--text", action="store_true", help="also print the tokens as text")
    inspect_parser.add_argument(
        "--json",
        action="store_true",
        help="print the file's JSON header as stored (fields: docs/session-format.md) instead of the summary",
    )
    inspect_parser.add_argument("--model", help="GGUF file for --text (default: the default model)")
    key_help = "file holding the secret key of signed sessions (or $LLAMA_SESSIONS_SECRET_KEY_FILE)"
    inspect_parser.add_argument("--key-file", help=key_help)
    inspect_parser.set_defaults(run=inspect)
    verify_parser = commands.add_parser(
        "verify", help="check that a session file is intact (and loadable with --model)"
    )
    verify_parser.add_argument("file", help="a session file")
    verify_parser.add_argument("--model", help="also load the session into a context of this GGUF model")
    verify_parser.add_argument("--key-file", help=key_help)
    verify_parser.set_defaults(run=verify)
    chat_parser = commands.add_parser(
        "chat",
        help="an interactive chat that persists and resumes",
        description="An interactive chat that persists in DIR/ID.session (or in the store --dir names): "
        "created with --system and --n-ctx "
        "when it does not exist, resumed when it does. A session keeps the system prompt and context size it "
        "was created with: for an existing session, a different --system or --n-ctx is refused (exit 2) "
        "before anything is loaded or written.",
    )
    chat_parser.add_argument(
        "--session", required=True, help="session id (in a directory, its file: DIR/ID.session)"
    )
    chat_parser.add_argument(
        "--system",
        help="system prompt of a new session (an existing session keeps its own: a different one is refused)",
    )
    chat_parser.add_argument("--model", help="GGUF file (default: the default model)")
    chat_parser.add_argument("--dir", default="sessions", help=STORE_HELP)
    chat_parser.add_argument(
        "--n-ctx",
        type=_positive_int,
        help=f"context size of a new session (default {DEFAULT_CHAT_N_CTX}); an existing session resumes "
        "with the one it was created with, and a different value is refused",
    )
    chat_parser.add_argument("--max-tokens", type=_positive_int, default=256, help="most tokens per answer")
    chat_parser.add_argument(
        "--temperature", type=_temperature, default=0.0, help="0 is greedy (default), higher is more random"
    )
    chat_parser.set_defaults(run=chat)
    sessions_parser = commands.add_parser(
        "sessions",
        help="list, show or delete stored sessions",
        description="list: every session in DIR (with an id, that one only); show ID: its header, system "
        "prompt and history; delete ID: the session, its checkpoints and their lock files.",
    )
    sessions_parser.add_argument("action", choices=["list", "show", "delete"])
    sessions_parser.add_argument("session_id", nargs="?", help="needed by show and delete; optional for list")
    sessions_parser.add_argument("--dir", default="sessions", help=STORE_HELP)
    sessions_parser.set_defaults(run=sessions)
    cache_parser = commands.add_parser(
        "cache",
        help="counts, garbage collection or removal of a prefix cache (KV chunks)",
        description="stats: chunks and bytes in DIR; gc: remove chunks whose bytes fail their checks "
        "(length, checksum, key) and, with --max-bytes, evict the least recently used down to that many "
        "bytes; clear: remove every chunk. See docs/prefix-cache.md.",
    )
    cache_parser.add_argument("action", choices=["stats", "gc", "clear"])
    cache_parser.add_argument(
        "--dir", help="prefix cache directory (default: the user cache's prefix-cache directory)"
    )
    cache_parser.add_argument(
        "--max-bytes",
        type=_positive_int,
        help="gc: evict down to this many bytes (never a chunk a stored session names)",
    )
    cache_parser.add_argument(
        "--sessions",
        help="session directory whose sessions' chunks gc never evicts (default: the parent of --dir, "
        "as a SessionManager keeps its chunks in SESSION_DIR/chunks)",
    )
    cache_parser.set_defaults(run=cache)
    export_parser = commands.add_parser(
        "export",
        help="write a stored session as one self-contained session file",
        description="Write session ID of the session directory as FILE in the single-file format, which "
        "Context.load_session() reads without the directory's chunk store (a SessionManager stores sessions "
        "as manifests of shared chunks by default). The session is opened with the parameters it was saved "
        "with.",
    )
    export_parser.add_argument("session_id", help="the session's id")
    export_parser.add_argument("file", help="the session file to write (replaced atomically)")
    export_parser.add_argument("--dir", default="sessions", help=STORE_HELP)
    export_parser.add_argument("--model", help="GGUF file (default: the default model)")
    export_parser.add_argument("--key-file", help=key_help)
    export_parser.set_defaults(run=export)
    serve_parser = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server whose conversations survive restarts (extra: server)",
        description="Serve the model over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models) plus /v1/sessions, /health and /metrics. Conversations run on sessions stored in "
        "--sessions: a client that names its session (header X-Session-Id) resumes it after a restart "
        "without reading it again. Needs pip install 'llama-sessions[server]'. See docs/server.md.",
    )
    serve_parser.add_argument("--model", help="GGUF file (default: the default model)")
    serve_parser.add_argument(
        "--sessions",
        default="sessions",
        help="session directory, or a store several servers share: redis://[:PASSWORD@]HOST:PORT/DB, "
        "rediss://... (TLS) or s3://BUCKET/PREFIX[?endpoint=...] (default ./sessions)",
    )
    serve_parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    serve_parser.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    serve_parser.add_argument(
        "--api-key",
        action="append",
        help="accept requests with 'Authorization: Bearer KEY' only (repeatable; each key's sessions are its "
        "own). Also read from $LLAMA_SESSIONS_API_KEY",
    )
    serve_parser.add_argument("--api-key-file", help="file of API keys, one per line ('#' comments)")
    serve_parser.add_argument(
        "--model-name", help="the model's id in the API (default: the GGUF file's name without .gguf)"
    )
    serve_parser.add_argument(
        "--n-ctx", type=_positive_int, default=2048, help="tokens per conversation (default 2048)"
    )
    serve_parser.add_argument(
        "--max-live",
        type=_positive_int,
        default=8,
        help="sessions kept in memory, decoded together (default 8; KV memory: max-live x n-ctx tokens)",
    )
    serve_parser.add_argument("--threads", type=_positive_int, help="llama.cpp threads (default: all cores)")
    serve_parser.add_argument(
        "--no-batching",
        action="store_true",
        help="one llama.cpp context per live session instead of one shared context decoding them together",
    )
    serve_parser.add_argument(
        "--kv-cells",
        type=_positive_int,
        help="KV cells (tokens) the live sessions share, whatever --max-live is; idle sessions are evicted "
        "for room (default: n-ctx cells per live session, each its own; faster, more memory)",
    )
    serve_parser.add_argument(
        "--default-max-tokens",
        type=_positive_int,
        default=512,
        help="answer length when a request gives no max_tokens (default 512)",
    )
    serve_parser.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=4 * 1024 * 1024,
        help="largest request body accepted (default 4 MiB)",
    )
    serve_parser.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info"
    )
    serve_parser.set_defaults(run=serve)
    fetch_parser = commands.add_parser("fetch-model", help="cache the default model and print its path")
    fetch_parser.set_defaults(run=fetch_model)
    return parser


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Prints a warning as one line in the CLI's voice, without Python's source location and line."""
    print(f"llama-sessions: warning: {category.__name__}: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llama-sessions`` console script."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code: int = args.run(args)
    except (LlamaSessionsError, OSError, ValueError) as error:
        print(f"llama-sessions: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return code
