"""The HTTP API: OpenAI's endpoints (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``), the
native session endpoints (``/v1/sessions``), ``/health`` and ``/metrics``, as a Starlette app."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..errors import LlamaSessionsError, SessionNotFoundError
from ..manager import SessionManager
from .auth import ApiKeys
from .errors import ApiError, bad_request, from_library_error
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, LabelRequest, parse_body
from .service import ChatTurn, Sampling, Service, TurnCounts, in_thread

#: Default bound of a request body (a long conversation in JSON).
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
#: Tokens an answer may have when the request does not say (OpenAI's max_tokens is optional).
DEFAULT_MAX_TOKENS = 512
#: Seconds a request waits for another request's turn on the same session before 409 session_busy.
DEFAULT_TURN_TIMEOUT = 120.0

Handler = Callable[[Request], Awaitable[Response]]


class Server:
    """The state behind the routes: the manager, the keys, the limits, the counters."""

    def __init__(
        self,
        manager: SessionManager,
        *,
        model_id: str,
        api_keys: Sequence[str],
        max_body_bytes: int,
        default_max_tokens: int,
        turn_timeout: float,
    ) -> None:
        self.manager = manager
        self.model_id = model_id
        self.keys = ApiKeys(api_keys)
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics(manager)
        self.service = Service(
            manager,
            self.metrics,
            turn_timeout=turn_timeout,
            default_max_tokens=default_max_tokens,
            slots_per_namespace=max(1, manager.max_live),
        )
        self.created = int(time.time())

    # Plumbing ------------------------------------------------------------------------------------------

    def route(
        self, name: str, handler: Callable[[Request, str], Awaitable[Response]], *, public: bool = False
    ) -> Handler:
        """``handler(request, namespace)`` behind authentication (unless ``public``), with every refusal and
        failure answered in OpenAI's error shape, and counted."""

        async def endpoint(request: Request) -> Response:
            namespace = ""
            try:
                namespace = "" if public else self.keys.namespace(request.headers.get("authorization"))
                response = await handler(request, namespace)
            except ApiError as error:
                response = error.response()
            except LlamaSessionsError as error:
                response = self.library_error(error, namespace).response()
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return endpoint

    def library_error(self, error: LlamaSessionsError, namespace: str) -> ApiError:
        """The API error of a library error, naming sessions as the client does (without the namespace the
        server stores them under)."""
        return from_library_error(
            error, hidden_prefix=self.service.named_prefix(namespace) if namespace else ""
        )

    async def body(self, request: Request) -> bytes:
        """The request body, refused (413) beyond ``max_body_bytes`` before more of it is read."""
        declared = request.headers.get("content-length", "")
        too_large = ApiError(
            413,
            f"the request body exceeds the server's limit of {self.max_body_bytes} bytes",
            code="request_too_large",
        )
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise ApiError(
                404,
                f"the model {model!r} does not exist: this server serves {self.model_id!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def sampling(
        self, request: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
    ) -> Sampling:
        return Sampling(
            max_tokens=self.service.default_max_tokens if max_tokens is None else max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop_strings(),
        )

    # OpenAI endpoints ----------------------------------------------------------------------------------

    async def models(self, request: Request, namespace: str) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_object()]})

    def model_object(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "llama-sessions"}

    async def chat_completions(self, request: Request, namespace: str) -> Response:
        body: ChatCompletionRequest = parse_body(await self.body(request), ChatCompletionRequest)
        body.check_supported()
        self.check_model(body.model)
        header = session_header(request)
        session_id = header if header is not None else body.session_id
        turn = await self.service.start_chat(
            namespace, session_id, body.conversation(), self.sampling(body, body.requested_max_tokens())
        )
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        if body.stream:
            return StreamingResponse(
                self.chat_events(turn, completion_id, body.include_usage_chunk(), namespace),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
                # Also when the client went away before the first event, whose generator then never ran.
                background=BackgroundTask(turn.end),
            )
        try:
            text = await turn.complete()
        finally:
            await turn.end()
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish_reason(turn.counts),
                    }
                ],
                "usage": usage(turn.counts),
            }
        )

    async def chat_events(
        self, turn: ChatTurn, completion_id: str, include_usage: bool, namespace: str
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: dict[str, str], reason: str | None) -> str:
            return event(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
                }
            )

        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for piece in turn.pieces():
                yield chunk({"content": piece}, None)
            await turn.end()
            yield chunk({}, finish_reason(turn.counts))
            if include_usage:
                yield event(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": self.model_id,
                        "choices": [],
                        "usage": usage(turn.counts),
                    }
                )
        except LlamaSessionsError as error:
            # The status line has gone: the error is the stream's last event, in OpenAI's error shape.
            yield event(self.library_error(error, namespace).body())
        finally:
            await turn.end()
        yield "data: [DONE]\n\n"

    async def completions(self, request: Request, namespace: str) -> Response:
        body: CompletionRequest = parse_body(await self.body(request), CompletionRequest)
        body.check_supported()
        self.check_model(body.model)
        text, counts = await self.service.complete_text(
            namespace, body.prompt_text(), self.sampling(body, body.max_tokens)
        )
        completion_id = f"cmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(counts)}
        document = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": self.model_id,
            "choices": [choice],
            "usage": usage(counts),
        }
        if not body.stream:
            return JSONResponse(document)

        async def events() -> AsyncIterator[str]:
            # The text was generated whole: it goes as one chunk.
            yield event({**document, "usage": usage(counts) if body.include_usage_chunk() else None})
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    # Sessions ------------------------------------------------------------------------------------------

    def stored(self, request: Request, namespace: str) -> tuple[str, str]:
        session_id = request.path_params["session_id"]
        return session_id, self.service.stored_id(namespace, session_id)

    async def require_session(self, stored: str, session_id: str) -> None:
        if not await in_thread(lambda: self.manager.exists(stored)):
            raise ApiError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")

    async def list_sessions(self, request: Request, namespace: str) -> Response:
        prefix = self.service.named_prefix(namespace)
        stored = await in_thread(self.manager.list)
        data = [
            {
                "id": s.id[len(prefix) :],
                "object": "session",
                "created_at": s.created_at.isoformat() if s.created_at else None,
                "updated_at": s.updated_at.isoformat() if s.updated_at else None,
                "message_count": s.message_count,
                "token_count": s.token_count,
            }
            for s in stored
            if s.id.startswith(prefix) and s.error is None
        ]
        return JSONResponse({"object": "list", "data": data})

    async def get_session(self, request: Request, namespace: str) -> Response:
        session_id, stored = self.stored(request, namespace)
        await self.require_session(stored, session_id)
        return JSONResponse(await in_thread(lambda: self.session_object(session_id, stored)))

    def session_object(self, session_id: str, stored: str) -> dict[str, Any]:
        system = self.manager.system_prompt(stored)
        messages = (
            [{"role": "system", "content": system}] if system is not None else []
        ) + self.manager.history(stored)
        return {
            "id": session_id,
            "object": "session",
            "messages": messages,
            "token_count": len(self.manager.load(stored).tokens),
            "checkpoints": self.manager.checkpoints(stored),
        }

    async def delete_session(self, request: Request, namespace: str) -> Response:
        session_id, stored = self.stored(request, namespace)
        try:
            await in_thread(lambda: self.manager.delete(stored))
        except SessionNotFoundError:
            raise ApiError(
                404, f"no session {session_id!r}", param="session_id", code="session_not_found"
            ) from None
        return JSONResponse({"id": session_id, "object": "session.deleted", "deleted": True})

    async def checkpoint(self, request: Request, namespace: str) -> Response:
        session_id, stored = self.stored(request, namespace)
        body: LabelRequest = parse_body(await self.body(request), LabelRequest)
        await self.require_session(stored, session_id)
        await in_thread(lambda: self.manager.checkpoint(stored, body.label))
        return JSONResponse(
            {"id": session_id, "object": "session.checkpoint", "label": body.label}, status_code=201
        )

    async def list_checkpoints(self, request: Request, namespace: str) -> Response:
        session_id, stored = self.stored(request, namespace)
        await self.require_session(stored, session_id)
        labels = await in_thread(lambda: self.manager.checkpoints(stored))
        return JSONResponse({"object": "list", "data": labels})

    async def revert(self, request: Request, namespace: str) -> Response:
        session_id, stored = self.stored(request, namespace)
        body: LabelRequest = parse_body(await self.body(request), LabelRequest)
        await self.require_session(stored, session_id)
        timeout = self.service.turn_timeout
        await in_thread(lambda: self.manager.revert(stored, body.label, timeout=timeout))
        return JSONResponse(await in_thread(lambda: self.session_object(session_id, stored)))

    # Operations ----------------------------------------------------------------------------------------

    async def health(self, request: Request, namespace: str) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, "version": __version__})

    async def metrics_text(self, request: Request, namespace: str) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def session_header(request: Request) -> str | None:
    """The ``X-Session-Id`` header, read as UTF-8 (HTTP hands header bytes over as Latin-1)."""
    raw = request.headers.get("x-session-id")
    if raw is None:
        return None
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise bad_request("invalid X-Session-Id header: expected UTF-8 text", param="session_id") from None


def finish_reason(counts: TurnCounts | None) -> str | None:
    if counts is None:
        return None
    return "stop" if counts.stop_reason in ("eog", "stop") else "length"


def usage(counts: TurnCounts | None) -> dict[str, Any] | None:
    if counts is None:
        return None
    return {
        "prompt_tokens": counts.prompt_tokens,
        "completion_tokens": counts.generated_tokens,
        "total_tokens": counts.prompt_tokens + counts.generated_tokens,
        # OpenAI's field for prompt tokens served from a cache: here, those the model did not read for this
        # request (held by the session's context, or restored).
        "prompt_tokens_details": {"cached_tokens": counts.reused_tokens},
    }


def event(document: dict[str, Any]) -> str:
    return f"data: {json.dumps(document, ensure_ascii=False)}\n\n"


def create_app(
    manager: SessionManager,
    *,
    model_id: str,
    api_keys: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    turn_timeout: float = DEFAULT_TURN_TIMEOUT,
) -> Starlette:
    """The server's ASGI app on ``manager``, serving its model as ``model_id``. With ``api_keys``, every
    request but ``/health`` needs one of them (``Authorization: Bearer KEY``), and each key's sessions are its
    own. Run it with any ASGI server (``llama-sessions serve`` runs it with uvicorn)."""
    server = Server(
        manager,
        model_id=model_id,
        api_keys=api_keys,
        max_body_bytes=max_body_bytes,
        default_max_tokens=default_max_tokens,
        turn_timeout=turn_timeout,
    )
    r = server.route
    routes = [
        Route("/v1/models", r("models", server.models), methods=["GET"]),
        Route("/v1/chat/completions", r("chat_completions", server.chat_completions), methods=["POST"]),
        Route("/v1/completions", r("completions", server.completions), methods=["POST"]),
        Route("/v1/sessions", r("sessions", server.list_sessions), methods=["GET"]),
        Route("/v1/sessions/{session_id}", r("session", server.get_session), methods=["GET"]),
        Route("/v1/sessions/{session_id}", r("session_delete", server.delete_session), methods=["DELETE"]),
        Route("/v1/sessions/{session_id}/checkpoints", r("checkpoint", server.checkpoint), methods=["POST"]),
        Route(
            "/v1/sessions/{session_id}/checkpoints",
            r("checkpoints", server.list_checkpoints),
            methods=["GET"],
        ),
        Route("/v1/sessions/{session_id}/revert", r("revert", server.revert), methods=["POST"]),
        Route("/health", r("health", server.health, public=True), methods=["GET"]),
        Route("/metrics", r("metrics", server.metrics_text), methods=["GET"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return ApiError(404, f"no endpoint {request.method} {request.url.path}", code="not_found").response()

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    async def server_error(request: Request, exc: Exception) -> Response:
        return ApiError(
            500, f"internal error: {type(exc).__name__}: {exc}", error_type="server_error"
        ).response()

    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed, Exception: server_error},
    )
    app.state.server = server
    return app
