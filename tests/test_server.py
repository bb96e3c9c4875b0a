"""``llama-sessions serve`` as OpenAI's own Python client sees it: a real server process on loopback, the real
model, the real ``openai`` package."""

from __future__ import annotations

import http.client
import json
import pathlib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import openai
import pytest

from llama_sessions import Context, ContextFullError, KvBudgetFullError, Model
from llama_sessions.server.errors import from_library_error

from conftest import assert_same_output
from server_process import ServerProcess, running_server

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
MODEL_ID = "smollm2"
SYSTEM = "You are a terse assistant. Answer in one short sentence."
GREEDY = {"temperature": 0.0, "max_tokens": 16}


@pytest.fixture(scope="module")
def server(model_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("server")
    with running_server(
        root / "sessions", model_path, "--model-name", MODEL_ID, "--api-key", KEY_A, "--api-key", KEY_B
    ) as process:
        yield process


def client(server: ServerProcess, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def reference_answer(model: Model, messages: list[dict[str, str]]) -> str:
    """What the library answers for the whole conversation in a fresh context of the server's size."""
    return Context(model, n_ctx=1024).chat(messages, GREEDY["max_tokens"], temperature=0.0)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_chat_answers_like_the_library_streamed_or_not(server: ServerProcess, model: Model) -> None:
    messages = [{"role": "system", "content": SYSTEM}, user("What is a lighthouse?")]
    expected = reference_answer(model, messages)
    api = client(server)

    whole = api.chat.completions.create(model=MODEL_ID, messages=messages, **GREEDY)  # type: ignore[arg-type]
    assert_same_output(whole.choices[0].message.content or "", expected)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None
    formatted = model.apply_chat_template(messages, add_generation_prompt=True)
    assert whole.usage.prompt_tokens == len(model.tokenize(formatted, special=True))
    assert whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        api.chat.completions.create(
            model=MODEL_ID,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,  # type: ignore[arg-type]
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert_same_output(streamed, expected)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # The same conversation again, on the slot that holds it: the prompt was not read again.
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens


def test_a_named_session_continues_reading_only_the_new_turn(server: ServerProcess, model: Model) -> None:
    api = client(server)
    messages = [{"role": "system", "content": SYSTEM}, user("Name a colour.")]
    first = api.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        extra_headers={"X-Session-Id": "ada"},
        **GREEDY,  # type: ignore[arg-type]
    )
    answer = first.choices[0].message.content or ""
    assert first.usage is not None
    messages += [assistant(answer), user("Name another one.")]
    second = api.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        extra_body={"session_id": "ada"},
        **GREEDY,  # type: ignore[arg-type]
    )
    assert_same_output(second.choices[0].message.content or "", reference_answer(model, messages))
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    # Everything the session held (the first conversation and its answer) was reused.
    held = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == held

    status, session = server.json("GET", "/v1/sessions/ada", KEY_A)
    assert status == 200
    assert session["messages"] == [*messages, assistant(second.choices[0].message.content or "")]
    status, listed = server.json("GET", "/v1/sessions", KEY_A)
    assert "ada" in [s["id"] for s in listed["data"]]

    # Errors name the session as the client does, never by the id the server stores it under.
    status, refused = server.json("POST", "/v1/sessions/ada/revert", KEY_A, {"label": "nope"})
    assert (status, refused["error"]["code"]) == (404, "session_not_found")
    assert '"ada@nope"' in refused["error"]["message"] and "-s-" not in refused["error"]["message"]

    # A header's id is UTF-8, as a body's is (http.client sends a str header as Latin-1: these are the bytes
    # of "zoë" in UTF-8).
    body = json.dumps({"model": MODEL_ID, "messages": [user("Hi.")], "max_tokens": 2}).encode()
    headers = {"Authorization": f"Bearer {KEY_A}", "X-Session-Id": "zo\xc3\xab"}
    assert server.request("POST", "/v1/chat/completions", body, headers)[0] == 200
    assert "zo\u00eb" in [s["id"] for s in server.json("GET", "/v1/sessions", KEY_A)[1]["data"]]


def test_a_restarted_server_resumes_a_session_without_reading_it_again(
    model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    sessions = tmp_path / "sessions"
    turn_one = [{"role": "system", "content": SYSTEM}, user("What is a harbour?")]

    def second_turn(api: openai.OpenAI, session: str, first_answer: str) -> str:
        messages = [*turn_one, assistant(first_answer), user("Why do ships need one?")]
        reply = api.chat.completions.create(
            model=MODEL_ID,
            messages=messages,
            extra_headers={"X-Session-Id": session},
            **GREEDY,  # type: ignore[arg-type]
        )
        return reply.choices[0].message.content or ""

    with running_server(sessions, model_path, "--model-name", MODEL_ID) as first_server:
        api = client(first_server, "unused")
        answers = {}
        for session in ("resumed", "uninterrupted"):
            reply = api.chat.completions.create(
                model=MODEL_ID,
                messages=turn_one,
                extra_headers={"X-Session-Id": session},
                **GREEDY,  # type: ignore[arg-type]
            )
            answers[session] = reply.choices[0].message.content or ""
        assert_same_output(answers["resumed"], answers["uninterrupted"])
        uninterrupted = second_turn(api, "uninterrupted", answers["uninterrupted"])

    with running_server(sessions, model_path, "--model-name", MODEL_ID) as second_server:
        resumed = second_turn(client(second_server, "unused"), "resumed", answers["resumed"])
        assert_same_output(resumed, uninterrupted)
        status, _, raw = second_server.request("GET", "/metrics")
        assert status == 200
        metrics = parse_metrics(raw.decode())
        assert metrics["llama_sessions_session_loads"] == 1.0
        # The stored history was restored; only the new user message (and the markup around it) was read.
        reused = metrics["llama_sessions_prompt_tokens_reused_total"]
        decoded = metrics["llama_sessions_prompt_tokens_decoded_total"]
        assert reused > 20
        assert 0 < decoded < 20


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+) ([0-9.e+-]+)", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def test_keys_are_required_and_each_key_sees_only_its_own_sessions(server: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        client(server, "key-z-0123456789abcdef").models.list()
    status, body = server.json("GET", "/v1/models")
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert [m.id for m in client(server).models.list().data] == [MODEL_ID]
    assert server.json("GET", "/health")[0] == 200  # open, for load balancers

    client(server, KEY_A).chat.completions.create(
        model=MODEL_ID, messages=[user("Say yes.")], extra_headers={"X-Session-Id": "mine"}, max_tokens=4
    )
    status, held_by_a = server.json("GET", "/v1/sessions/mine", KEY_A)
    assert status == 200
    assert server.json("GET", "/v1/sessions/mine", KEY_B)[0] == 404
    assert "mine" not in [s["id"] for s in server.json("GET", "/v1/sessions", KEY_B)[1]["data"]]
    assert server.json("DELETE", "/v1/sessions/mine", KEY_B)[0] == 404
    # B's request on the same id is B's own session: A's is untouched.
    client(server, KEY_B).chat.completions.create(
        model=MODEL_ID, messages=[user("Say no.")], extra_headers={"X-Session-Id": "mine"}, max_tokens=4
    )
    assert server.json("GET", "/v1/sessions/mine", KEY_A)[1] == held_by_a
    assert server.json("GET", "/v1/sessions/mine", KEY_B)[1]["messages"][0] == user("Say no.")
    assert server.json("DELETE", "/v1/sessions/mine", KEY_B)[0] == 200
    assert server.json("GET", "/v1/sessions/mine", KEY_A)[1] == held_by_a


def test_bad_requests_get_openai_errors(server: ServerProcess) -> None:
    api = client(server)
    with pytest.raises(openai.NotFoundError) as unknown:
        api.chat.completions.create(model="gpt-4o", messages=[user("hi")])
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        api.chat.completions.create(model=MODEL_ID, messages=[user("word " * 1200)], max_tokens=8)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
        api.chat.completions.create(model=MODEL_ID, messages=[{"role": "tool", "content": "x"}])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        api.chat.completions.create(model=MODEL_ID, messages=[user("hi")], n=2)
    with pytest.raises(openai.BadRequestError, match="invalid session id"):
        api.chat.completions.create(
            model=MODEL_ID, messages=[user("hi")], extra_headers={"X-Session-Id": "../x"}
        )

    auth = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    for body, expected in [
        (b"{not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (json.dumps({"model": MODEL_ID, "messages": "hi"}).encode(), "messages"),
        (json.dumps({"model": MODEL_ID, "messages": [user("hi")], "max_tokens": "5"}).encode(), "max_tokens"),
        (json.dumps({"model": MODEL_ID, "messages": [user("hi")], "temperature": 3}).encode(), "temperature"),
        (
            json.dumps({"model": MODEL_ID, "messages": [user("hi")], "max_tokens": 10**20}).encode(),
            "max_tokens",
        ),
        (json.dumps({"model": MODEL_ID, "messages": [user("hi")], "seed": 2**64}).encode(), "seed"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
        (b"\xff\xfe", "not valid JSON"),
    ]:
        status, _, raw = server.request("POST", "/v1/chat/completions", body, auth)
        error = json.loads(raw)["error"]
        assert (status, error["type"]) == (400, "invalid_request_error"), raw
        assert expected in error["message"]
    status, _, raw = server.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": MODEL_ID, "messages": [user("hi")]}).encode(),
        {**auth, "X-Session-Id": "caf\xe9"},  # Latin-1 bytes: not UTF-8
    )
    assert (status, json.loads(raw)["error"]["message"]) == (
        400,
        "invalid X-Session-Id header: expected UTF-8 text",
    )
    status, _, raw = server.request("POST", "/v1/chat/completions", b"x" * (4 * 1024 * 1024 + 1), auth)
    assert (status, json.loads(raw)["error"]["code"]) == (413, "request_too_large")
    status, _, raw = server.request("GET", "/v1/nowhere", None, auth)
    assert status == 404 and "error" in json.loads(raw)


def test_plain_completions_reuse_the_prompt_they_share(server: ServerProcess) -> None:
    api = client(server)
    prompt = "The three primary colours are"
    first = api.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0)
    second = api.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0)
    assert_same_output(second.choices[0].text, first.choices[0].text)
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens


def test_concurrent_clients_each_get_their_own_conversation(server: ServerProcess) -> None:
    questions = {
        f"c{i}": f"Give me a word that rhymes with {word}."
        for i, word in enumerate(["cat", "sun", "tree", "day"])
    }
    errors: list[BaseException] = []

    def chat(session: str, question: str) -> None:
        try:
            client(server).chat.completions.create(
                model=MODEL_ID,
                messages=[user(question)],
                extra_headers={"X-Session-Id": session},
                max_tokens=12,
            )
        except BaseException as error:  # reported below, with the session
            errors.append(error)

    threads = [threading.Thread(target=chat, args=item) for item in questions.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for session, question in questions.items():
        messages = server.json("GET", f"/v1/sessions/{session}", KEY_A)[1]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[0] == user(question)
        assert messages[1]["content"] != ""


def test_a_client_that_goes_away_mid_stream_frees_its_session(server: ServerProcess) -> None:
    messages = [user("Tell me a long story about a dragon.")]
    body = json.dumps({"model": MODEL_ID, "messages": messages, "max_tokens": 200, "stream": True}).encode()
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json", "X-Session-Id": "gone"}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    connection.close()

    # The next turn on the session gets it (the abandoned one ended without joining the history).
    reply = client(server).chat.completions.create(
        model=MODEL_ID, messages=messages, extra_headers={"X-Session-Id": "gone"}, max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content
    history = server.json("GET", "/v1/sessions/gone", KEY_A)[1]["messages"]
    assert history == [*messages, assistant(reply.choices[0].message.content or "")]


def test_sessions_that_share_a_system_prompt_read_it_once(server: ServerProcess, model: Model) -> None:
    system = "You answer questions about a harbour. " + " ".join(
        f"Pier {i} is for boats of size {i}." for i in range(40)
    )
    formatted = model.apply_chat_template(
        [{"role": "system", "content": system}], add_generation_prompt=False
    )
    system_tokens = len(model.tokenize(formatted, special=True))
    assert system_tokens > 300
    cached = []
    for session, question in (
        ("pier-a", "Which pier is for size 3?"),
        ("pier-b", "Which pier is for size 7?"),
    ):
        reply = client(server).chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "system", "content": system}, user(question)],
            extra_headers={"X-Session-Id": session},
            max_tokens=4,
        )
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
    # The first request read the system prompt (creating its session); the second session restored it.
    assert cached[0] == 0
    assert cached[1] == system_tokens


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--api-key", "short"], "an API key must be at least 16 printable ASCII characters"),
        (["--port", "70000"], "expected a port from 1 to 65535"),
        (["--no-batching", "--kv-cells", "512"], "--kv-cells are the cells the batched sessions share"),
        (["--kv-cells", "0"], "expected a whole number of at least 1, got 0"),
        (["--api-key-file", "EMPTY"], "holds no API key"),
    ],
)
def test_a_refused_command_line_exits_2_before_loading_anything(
    tmp_path: pathlib.Path, arguments: list[str], message: str
) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# no key yet\n\n")
    command = [
        "serve",
        "--sessions",
        str(tmp_path / "s"),
        *[str(empty) if a == "EMPTY" else a for a in arguments],
    ]
    result = subprocess.run(
        [sys.executable, "-m", "llama_sessions", *command], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_full_shared_kv_cache_is_a_503_the_client_may_retry() -> None:
    """The sessions of other requests hold the cells: not the request's fault (400), the server's capacity."""
    error = from_library_error(
        KvBudgetFullError("the shared KV cache is full: 30 more cells needed but only 12 of kv_cells=256")
    )
    assert (error.status, error.code, error.error_type) == (503, "kv_cache_full", "server_error")
    assert error.message.endswith("The server is at capacity; retry when other requests have ended")
    too_long = from_library_error(ContextFullError("context full: the conversation needs 900 tokens"))
    assert (too_long.status, too_long.code) == (400, "context_length_exceeded")
