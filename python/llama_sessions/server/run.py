"""Running the server from the command line (``llama-sessions serve``): the manager, the keys, uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

import uvicorn

from .._native import Model
from ..manager import SessionManager
from .app import create_app
from .auth import ApiKeys, read_key_file

#: Environment variable that may hold one API key (keys on a command line are visible to other users).
API_KEY_ENV = "LLAMA_SESSIONS_API_KEY"


def api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or [])
    if args.api_key_file:
        keys += read_key_file(args.api_key_file)
    if os.environ.get(API_KEY_ENV):
        keys.append(os.environ[API_KEY_ENV])
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace, model_path: Path) -> int:
    if args.kv_cells is not None and args.no_batching:
        print(
            "llama-sessions: --kv-cells are the cells the batched sessions share: drop --no-batching, or "
            "--kv-cells",
            file=sys.stderr,
        )
        return 2
    keys = api_keys(args)
    if args.api_key_file and not keys:
        print(f"llama-sessions: {args.api_key_file} holds no API key", file=sys.stderr)
        return 2
    try:
        ApiKeys(keys)  # checked before the model is loaded
    except ValueError as error:
        print(f"llama-sessions: {error}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not keys:
        print(
            f"llama-sessions: warning: serving on {args.host} without an API key: anyone who can reach it "
            "can read and continue every session (give --api-key or --api-key-file)",
            file=sys.stderr,
        )
    model = Model.load(model_path)
    manager = SessionManager(
        model,
        args.sessions,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        max_live=args.max_live,
        batching=not args.no_batching,
        kv_cells=args.kv_cells,
        # A request's conversation is the client's: refuse one that does not fit rather than cut it.
        overflow="error",
    )
    model_id = args.model_name or model.path.name.removesuffix(".gguf")
    app = create_app(
        manager,
        model_id=model_id,
        api_keys=keys,
        max_body_bytes=args.max_body_bytes,
        default_max_tokens=args.default_max_tokens,
    )
    print(
        f"llama-sessions: serving {model_id!r} on http://{args.host}:{args.port}/v1 (sessions in "
        f"{args.sessions}, {len(keys)} API key{'s' if len(keys) != 1 else ''}, n_ctx {manager.params.n_ctx}, "
        f"{'batching ' if manager.batching else ''}{manager.max_live} live sessions"
        f"{f' sharing {manager.kv_cells} KV cells' if manager.kv_cells else ''})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug"
    )
    return 0
