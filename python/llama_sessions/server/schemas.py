"""The request bodies the server accepts, checked by pydantic before any inference: what OpenAI's API defines
and the server supports. A field the server does not support with a value that would change the answer
(``n`` above 1, tools, log probabilities, penalties) is refused with 400 rather than silently ignored; other
fields (``user``, ``logit_bias``, ...) are ignored, as OpenAI's clients send them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ApiError, bad_request

#: Roles a chat message may have; "developer" is OpenAI's newer name for "system".
CHAT_ROLES = ("system", "developer", "user", "assistant")
#: Most stop strings per request (OpenAI's limit).
MAX_STOP_STRINGS = 4
#: Largest max_tokens parsed: a larger one could never fit a context (nor the library's integers).
MAX_TOKENS_BOUND = 2**31 - 1


class _Request(BaseModel):
    # Strict: "5" is not a number and 1 is not a bool, as in OpenAI's API; unknown fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Request):
    role: str
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    #: The library's seeds are 32-bit.
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | None = None

    def check_supported(self) -> None:
        """Refuses the values of supported-looking fields that this server cannot honour."""
        if self.n != 1:
            raise bad_request(f"n must be 1 (one answer per request), found {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise bad_request(
                    f"{name} is not supported: expected 0, found {getattr(self, name)}", param=name
                )
        if self.logprobs:
            raise bad_request("logprobs is not supported: expected false or no field", param="logprobs")
        stops = self.stop_strings()
        if len(stops) > MAX_STOP_STRINGS or any(stop == "" for stop in stops):
            raise bad_request(
                f"stop: expected up to {MAX_STOP_STRINGS} non-empty strings, found {self.stop!r}",
                param="stop",
            )

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    session_id: str | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise bad_request("tools are not supported: expected no tools", param="tools")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise bad_request(
                f"response_format: only {{'type': 'text'}} is supported, found {self.response_format!r}",
                param="response_format",
            )
        for index, message in enumerate(self.messages):
            if message.role not in CHAT_ROLES:
                roles = ", ".join(CHAT_ROLES)
                raise bad_request(
                    f"messages[{index}].role: expected one of {roles}, found {message.role!r}",
                    param=f"messages[{index}].role",
                )

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the library takes them ("developer" is a system message)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1, le=MAX_TOKENS_BOUND)
    echo: bool = False
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise bad_request(
                f"prompt: expected a string (or a list of one), found a list of {len(self.prompt)}",
                param="prompt",
            )
        if self.echo:
            raise bad_request("echo is not supported: expected false", param="echo")
        if self.suffix:
            raise bad_request("suffix is not supported: expected no suffix", param="suffix")

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class LabelRequest(_Request):
    label: str


def parse_body(raw: bytes, schema: type[_Request]) -> Any:
    """The request body ``raw`` as ``schema``, or a 400 ApiError that says what is wrong and where."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise bad_request("the request body is not valid JSON: it is nested too deeply") from None
    if not isinstance(document, dict):
        raise bad_request(f"the request body must be a JSON object, found {type(document).__name__}")
    try:
        return schema.model_validate(document)
    except ValidationError as error:
        raise _validation_error(error) from None


def _validation_error(error: ValidationError) -> ApiError:
    problems = error.errors(include_url=False)
    described = []
    for problem in problems[:3]:
        where = ".".join(str(part) for part in problem["loc"])
        found = problem.get("input")
        found_text = "" if problem["type"] == "missing" else f", found {json.dumps(found)[:80]}"
        described.append(f"{where}: {problem['msg']}{found_text}")
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    first = ".".join(str(part) for part in problems[0]["loc"]) if problems else None
    return bad_request("invalid request body: " + "; ".join(described) + more, param=first)
