"""Errors as OpenAI's API reports them: a status code and ``{"error": {"message", "type", "param", "code"}}``,
so that OpenAI's clients raise their usual exceptions (``openai.BadRequestError``, ...) with our message."""

from __future__ import annotations

from starlette.responses import JSONResponse

from ..errors import (
    ChatTemplateError,
    ContextFullError,
    InvalidParameterError,
    KvBudgetFullError,
    LlamaSessionsError,
    SessionBusyError,
    SessionConflictError,
    SessionExistsError,
    SessionNotFoundError,
    TokenizeError,
)


class ApiError(Exception):
    """A request the server refuses or could not serve, with what its client is told."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_library_error(error: LlamaSessionsError, *, hidden_prefix: str = "") -> ApiError:
    """The API error of a library exception raised while serving a request: the message is the library's own,
    which says what was expected and what was found, with ``hidden_prefix`` (the namespace a client's session
    ids are stored under) taken out."""
    message = str(error).replace(hidden_prefix, "") if hidden_prefix else str(error)
    if isinstance(error, KvBudgetFullError):
        # Not the request's fault: the sessions in other requests hold the server's KV cells for now.
        return ApiError(
            503,
            f"{message}. The server is at capacity; retry when other requests have ended",
            error_type="server_error",
            code="kv_cache_full",
        )
    if isinstance(error, ContextFullError):
        return ApiError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(error, (InvalidParameterError, TokenizeError)):
        return bad_request(message)
    if isinstance(error, ChatTemplateError):
        return bad_request(f"{message}; send a prompt to /v1/completions instead", code="no_chat_template")
    if isinstance(error, SessionNotFoundError):
        return ApiError(404, message, code="session_not_found")
    if isinstance(error, SessionBusyError):
        return ApiError(
            409,
            f"{message}: another request on this session is still running; retry when it has ended",
            error_type="conflict_error",
            code="session_busy",
        )
    if isinstance(error, (SessionConflictError, SessionExistsError)):
        return ApiError(409, message, error_type="conflict_error", code="session_conflict")
    return ApiError(500, f"{type(error).__name__}: {message}", error_type="server_error")
