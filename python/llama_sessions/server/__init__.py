"""``llama-sessions serve``: an OpenAI-compatible HTTP server whose conversations survive restarts (see
docs/server.md). Needs the ``server`` extra: ``pip install 'llama-sessions[server]'``.

>>> from llama_sessions import Model, SessionManager, default_model_path
>>> from llama_sessions.server import create_app
>>> manager = SessionManager(Model.load(default_model_path()), "sessions", batching=True)
>>> app = create_app(manager, model_id="smollm2")  # any ASGI server runs it: uvicorn.run(app)
"""

from __future__ import annotations

from .app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS, DEFAULT_TURN_TIMEOUT, create_app
from .auth import read_key_file

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TURN_TIMEOUT",
    "create_app",
    "read_key_file",
]
