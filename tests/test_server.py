"""`specdec serve` against a live server on loopback, driven by the official `openai` client and raw httpx.

A tiny random Llama saved to a temporary directory is served by uvicorn in a background thread (and once by
the real `specdec serve` command in a subprocess). Every answer is compared with `SpecDecoder.generate` on the
same weights: the server must add nothing and lose nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec import Drafter, DraftTree, SpecDecoder
from specdec.cli import main
from specdec.errors import InputError
from specdec.server.app import Limits, create_app
from specdec.server.cli import listen, load_decoders, uvicorn_config
from specdec.server.errors import APIError
from specdec.server.worker import EngineWorker, Failed, Finished, Job, Prompt, Started

import tiny

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 60.0
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LIMITS = Limits(max_prompt_tokens=200, max_tokens=64, max_body_bytes=20_000, max_queued=32)
PROMPTS = ["def add(a, b):\n", "import os\n", "class Tree:\n    def __init__(self", "x = [1, 2, 3]\nfor"]
GATE = threading.Event()  # the gated drafter blocks in propose() while this is clear
GATE.set()
STEP_SECONDS = [0.0]  # and then sleeps this long: tokens at a steady pace


class GatedDrafter(Drafter):
    """Plain decoding that waits for GATE (then STEP_SECONDS) before every step after the first: a
    generation held mid-way, or one whose tokens come at a steady pace."""

    name = "gated"

    def start(self, request) -> list[int]:
        return [0]  # steps proposed so far in this generation

    def propose(self, state: list[int], context: list[int], max_depth: int) -> DraftTree:
        state[0] += 1
        if state[0] > 1:
            assert GATE.wait(timeout=TIMEOUT)
            time.sleep(STEP_SECONDS[0])
        return DraftTree.root_only(context[-1])


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model as shipped: no chat template."""
    return tiny.save(tmp_path_factory.mktemp("tiny-plain"))


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, model_dir):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-chat")
    tiny.model("llama", dtype=torch.float32).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(model_dir)  # a copy: tiny.tokenizer() is shared by every test
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ref(chat_dir):
    """Reference decoders in the test process, over their own copy of the weights."""
    return load_decoders(str(chat_dir), None, ["pld", "vanilla"], "float32")


@pytest.fixture(scope="module")
def server(chat_dir):
    import uvicorn

    decoders = load_decoders(str(chat_dir), None, ["pld", "vanilla"], "float32")
    pld = decoders["pld"]
    decoders["gated"] = SpecDecoder(pld.model, pld.tokenizer, GatedDrafter())
    # with a prefix cache: every response below is also checked against a fresh, uncached decoder's (`ref`)
    app = create_app(decoders, model_name="tiny", api_key=KEY, limits=LIMITS, prefix_cache_mb=4)
    # the server's own settings (deadlines on receiving requests), with deadlines no test comes near
    config = uvicorn_config(
        app, log_level="warning", request_start=TIMEOUT, request_complete=TIMEOUT, keep_alive=TIMEOUT
    )
    srv = uvicorn.Server(config)
    sock = listen("127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: srv.started), "server did not start"
    srv.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield srv
    GATE.set()
    srv.should_exit = True
    thread.join(timeout=20)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def chat_ids(dec: SpecDecoder, messages: list[dict]) -> list[int]:
    text = dec.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dec.tokenizer(text, add_special_tokens=False)["input_ids"]


def solo(ref, method: str, prompt, **params):
    dec = ref[method]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        prompt = chat_ids(dec, prompt)
    return dec.generate(prompt, **params)


def assert_error(response: httpx.Response, status: int, param: str | None = "?") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "?":
        assert error["param"] == param, error
    return error


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of an event stream; asserts it ends with [DONE]."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


# --- completions and chat, streamed and not, equal to SpecDecoder.generate ----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pld", "vanilla"])
def test_completion_equals_generate(client, ref, method):
    prompt = PROMPTS[0]
    want = solo(ref, method, prompt, max_new_tokens=20)
    got = client.completions.create(
        model="anything", prompt=prompt, max_tokens=20, temperature=0, extra_body={"specdec_method": method}
    )
    choice = got.choices[0]
    assert choice.text == want.text
    assert choice.finish_reason == "length" and got.model == "tiny" and got.object == "text_completion"
    n_prompt = len(ref[method].encode(prompt))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (n_prompt, len(want.token_ids))
    assert got.usage.total_tokens == n_prompt + len(want.token_ids)
    stats = got.model_extra["specdec"]
    assert stats["method"] == method and stats["finish_reason"] == "length"
    assert stats["target_forwards"] == want.stats.target_forwards
    assert stats["mean_accepted_tokens"] == pytest.approx(want.stats.mean_accepted_tokens)


def test_completion_stream_equals_generate(client, ref):
    prompt = PROMPTS[2]
    want = solo(ref, "pld", prompt, max_new_tokens=24)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == want.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert text_chunks[-1].model_extra["specdec"]["target_forwards"] == want.stats.target_forwards
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == len(want.token_ids)


def test_chat_equals_generate_streamed_and_not(client, ref):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": PROMPTS[1]}]
    want = solo(ref, "vanilla", messages, max_new_tokens=16)
    kwargs = {"model": "tiny", "messages": messages, "max_tokens": 16, "temperature": 0}
    kwargs["extra_body"] = {"specdec_method": "vanilla"}
    got = client.chat.completions.create(**kwargs)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(chat_ids(ref["vanilla"], messages))
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["specdec"]["method"] == "vanilla"


@pytest.mark.slow
def test_cli_generate_json_equals_server(client, chat_dir, capsys):
    prompt = PROMPTS[3]
    assert main(["generate", prompt, "--model", str(chat_dir), "--json", "--max-new-tokens", "14"]) == 0
    row = json.loads(capsys.readouterr().out)
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=14, temperature=0)
    assert got.choices[0].text == row["text"]
    assert got.usage.completion_tokens == len(row["token_ids"])
    assert got.model_extra["specdec"]["target_forwards"] == row["stats"]["target_forwards"]


def test_sampling_parameters_reach_the_engine(client, ref):
    """Seeded sampling with top_p/top_k is reproducible and equal to the library's own seeded run."""
    params = {"temperature": 0.9, "top_p": 0.8, "seed": 11}
    want = solo(ref, "pld", PROMPTS[0], max_new_tokens=16, top_k=20, **params)
    got = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=16, extra_body={"top_k": 20}, **params
    )
    assert got.choices[0].text == want.text
    other = solo(ref, "pld", PROMPTS[0], max_new_tokens=16, top_k=20, **{**params, "seed": 12})
    assert other.token_ids != want.token_ids  # the seed really matters, so the equality above means something


def test_stop_string_and_token_prompt(client, ref):
    free = solo(ref, "pld", PROMPTS[0], max_new_tokens=30)
    text = free.text
    stop = next(
        text[i : i + 2]
        for i in range(len(text) // 3, len(text) - 1)
        if not any(c.isspace() or c == "\ufffd" for c in text[i : i + 2])
    )
    want = solo(ref, "pld", PROMPTS[0], max_new_tokens=30, stop=[stop])
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=stop)
    assert got.choices[0].finish_reason == "stop" and got.choices[0].text == want.text
    assert got.model_extra["specdec"]["finish_reason"] == "stop"
    ids = ref["pld"].encode(PROMPTS[0])
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=30, temperature=0)
    assert by_ids.choices[0].text == free.text


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["specdec_methods"] == ["pld", "vanilla", "gated"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(f"{server.base_url}/health", timeout=TIMEOUT)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_nulls_mean_defaults(server, ref):
    """OpenAI's parameters are nullable; null means the default (max_tokens 16 for completions)."""
    nulls = {"top_p": None, "n": None, "stop": None, "seed": None, "stream": None, "max_tokens": None}
    body = {"prompt": PROMPTS[1], "temperature": 0, **nulls}
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT)
    want = solo(ref, "pld", PROMPTS[1], max_new_tokens=16)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want.text
    assert r.json()["usage"]["completion_tokens"] == len(want.token_ids)


# --- errors: always 4xx with OpenAI-style JSON, never 422 or 500 ---------------------------------------------

BAD_COMPLETIONS = [
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 65}, "max_tokens"),  # over the server's limit
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "max_token": 5}, "max_token"),
    ({"prompt": "x", "specdec_method": "medusa"}, "specdec_method"),
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 999]}, "prompt"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": "def f():\n" * 100}, "prompt"),  # over the server's prompt limit
    ({"prompt": "", "stream": True}, None),  # empty: refused before the stream starts
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),  # as OpenAI: stream only
    ({"prompt": "x", "stream": False, "stream_options": {}}, "stream_options"),
]


@pytest.mark.slow
@pytest.mark.parametrize("body,param", BAD_COMPLETIONS, ids=[json.dumps(b)[:40] for b, _ in BAD_COMPLETIONS])
def test_bad_completion_requests(server, body, param):
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT)
    error = assert_error(r, 400, param)
    if body.get("prompt") == "def f():\n" * 100:
        assert error["code"] == "context_length_exceeded"


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, None),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0]"),  # once the literal prompt "None"
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0]"),  # null only with tool_calls
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, None),
]


@pytest.mark.parametrize("body,param", BAD_CHATS, ids=[json.dumps(b)[:40] for b, _ in BAD_CHATS])
def test_bad_chat_requests(server, body, param):
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=TIMEOUT)
    error = assert_error(r, 400)
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    "raw, param, message",
    [
        (b'{"prompt": "x", "temperature": NaN}', "temperature", "temperature: must be a finite number"),
        (b'{"prompt": "x", "temperature": Infinity}', "temperature", "temperature: must be a finite number"),
        (b'{"prompt": "x", "top_p": -Infinity}', "top_p", "top_p: must be a finite number"),
        (b'{"prompt": "caf\\udce9"}', "prompt", "prompt: a lone surrogate escape (\\udce9)"),
        (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content", "lone surrogate"),
    ],
)
def test_non_finite_numbers_and_lone_surrogates(server, raw, param, message):
    """NaN once got "less than or equal to 2"; a lone surrogate escape (valid JSON syntax, but no character)
    "not valid JSON"."""
    endpoint = "chat/completions" if b"messages" in raw else "completions"
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(f"{server.base_url}/v1/{endpoint}", content=raw, headers=headers, timeout=TIMEOUT)
    error = assert_error(r, 400, param)
    assert message in error["message"] and "not valid JSON" not in error["message"], error


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
TOOL_CHAT = [
    {"role": "user", "content": "add 1 and 2"},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "3"},
]
TOOL_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}"
    "{{ m.content }}{% for c in m.tool_calls or [] %}<call {{ c.id }}>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}{% endfor %}\n{% endfor %}<|assistant|>"
)


def test_chat_tool_messages_go_through_the_template(chat_dir):
    """A tool message with its tool_call_id and an assistant message with tool_calls (once refused as
    unknown arguments) reach the template as transformers' apply_chat_template takes them: the arguments
    as a dict (templates `tojson` them), a null content as empty."""
    from fastapi.testclient import TestClient

    dec = load_decoders(str(chat_dir), None, ["pld"], "float32")["pld"]
    dec.tokenizer.chat_template = TOOL_TEMPLATE
    as_transformers = [
        TOOL_CHAT[0],
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{**TOOL_CALL, "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
        },
        TOOL_CHAT[2],
    ]
    text = dec.tokenizer.apply_chat_template(as_transformers, tokenize=False)
    assert "[call_1]3" in text and '<call call_1>add{"a": 1, "b": 2}' in text  # the template saw it all
    want = dec.generate(dec.tokenizer(text, add_special_tokens=False)["input_ids"], max_new_tokens=6)
    with TestClient(create_app(dec)) as c:
        r = c.post("/v1/chat/completions", json={"messages": TOOL_CHAT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want.text


def test_chat_tool_calls_a_template_ignores_are_not_lost(server, ref):
    """A template that knows no tool_calls (this one renders role and content only) would drop the calls
    silently: they are written into the assistant's content instead, as JSON."""
    from specdec.server.app import _render_chat
    from specdec.server.schemas import ChatMessage

    messages = [ChatMessage.model_validate(m).for_template() for m in TOOL_CHAT]
    ids = _render_chat(ref["pld"], messages)
    text = ref["pld"].tokenizer.decode(ids)
    assert '"name": "add", "arguments": {"a": 1, "b": 2}' in text, text
    assert "<|tool|>\n3\n" in text
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"messages": TOOL_CHAT, "max_tokens": 6, "temperature": 0},
        headers=AUTH,
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    assert r.json()["choices"][0]["message"]["content"] == ref["pld"].generate(ids, max_new_tokens=6).text


def test_transport_level_errors(server):
    url = f"{server.base_url}/v1/completions"
    with httpx.Client(timeout=TIMEOUT) as c:
        assert_error(c.post(url, json={"prompt": "x"}), 401)
        assert_error(c.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401)
        as_json = {**AUTH, "Content-Type": "application/json"}
        assert_error(c.post(url, content=b"{not json", headers=as_json), 400)
        assert_error(c.post(url, content=b"\xff\xfe", headers=as_json), 400)
        assert_error(c.post(url, content=b"[1, 2]", headers=as_json), 400)
        big = json.dumps({"prompt": "x" * 30_000}).encode()
        assert_error(c.post(url, content=big, headers=as_json), 413)
        chunked = (big[i : i + 4096] for i in range(0, len(big), 4096))  # no Content-Length
        assert_error(c.post(url, content=chunked, headers=as_json), 413)
        assert_error(c.get(f"{server.base_url}/v1/nothing", headers=AUTH), 404)
        assert_error(c.get(url, headers=AUTH), 405)
        # still healthy and correct afterwards
        assert c.post(url, json={"prompt": "x", "max_tokens": 2}, headers=AUTH).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ],
)
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_only_json_content_type_is_accepted(server, endpoint, content_type):
    """A web page may POST these types (or none) to any address without a CORS preflight; a JSON body sent
    that way must not start a generation on a local server."""
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    body.pop("messages" if endpoint == "completions" else "prompt")
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    url = f"{server.base_url}/v1/{endpoint}"
    r = httpx.post(url, content=json.dumps(body).encode(), headers=headers, timeout=TIMEOUT)
    assert assert_error(r, 415, None)["code"] == "unsupported_media_type"
    as_json = {**headers, "Content-Type": "Application/JSON; charset=utf-8"}
    assert (
        httpx.post(url, content=json.dumps(body).encode(), headers=as_json, timeout=TIMEOUT).status_code
        == 200
    )


def test_prompt_over_the_model_context_has_its_code(ref):
    """The engine's check (prompt + max_tokens over the model's 512 positions) answers with OpenAI's code and
    the field the prompt came from, like the server's own limit does."""
    from fastapi.testclient import TestClient

    long_text = "x = 1\n" * 400
    with TestClient(create_app(ref["pld"])) as c:
        r = c.post("/v1/completions", json={"prompt": long_text, "max_tokens": 4})
        error = assert_error(r, 400, "prompt")
        assert error["code"] == "context_length_exceeded" and "context of 512" in error["message"]
        chat = {"messages": [{"role": "user", "content": long_text}], "max_tokens": 4}
        error = assert_error(c.post("/v1/chat/completions", json=chat), 400, "messages")
        assert error["code"] == "context_length_exceeded"
        r = c.post("/v1/completions", json={"prompt": long_text, "max_tokens": 4, "stream": True})
        assert assert_error(r, 400, "prompt")["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "key, message",
    [
        ("", "the API key is empty"),
        ("   ", "the API key is empty"),
        (" k3y", "the API key starts or ends with whitespace"),
    ],
)
def test_empty_api_key_is_refused(ref, capsys, monkeypatch, key, message):
    """An empty key would switch authentication on with a secret a bare 'Authorization: Bearer' matches (and
    one with surrounding spaces could never be matched, as the header's token is stripped)."""
    with pytest.raises(InputError, match=message):
        create_app(ref["pld"], api_key=key)
    # refused at start, before any model is loaded (this one does not exist)
    assert main(["serve", "--model", "/nonexistent/model", "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"specdec: error: {message}"), err
    monkeypatch.setenv("SPECDEC_API_KEY", key)
    assert main(["serve", "--model", "/nonexistent/model"]) == 2
    assert capsys.readouterr().err.startswith(f"specdec: error: {message}")


@pytest.mark.parametrize(
    "option", ["--timeout-request-start", "--timeout-request-complete", "--timeout-keep-alive"]
)
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_serve_timeouts_are_positive_seconds(capsys, option, value):
    assert main(["serve", "--model", "/nonexistent/model", option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"specdec: error: argument {option}:"), err


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "lots"])
def test_prefix_cache_budget_is_megabytes(capsys, value):
    assert main(["serve", "--model", "/nonexistent/model", "--prefix-cache-mb", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --prefix-cache-mb" in err, err


@pytest.mark.slow
def test_chat_without_template_is_a_clear_400(model_dir):
    """The shipped code model has no chat template: chat must say so, completions must work."""
    dec = SpecDecoder.from_pretrained(str(model_dir))
    app = create_app(dec, model_name="plain")
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        error = assert_error(
            c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 400
        )
        assert error["code"] == "chat_template_missing" and "/v1/completions" in error["message"]
        got = c.post("/v1/completions", json={"prompt": "x = 1\n", "max_tokens": 5, "temperature": 0})
        assert got.json()["choices"][0]["text"] == dec.generate("x = 1\n", max_new_tokens=5).text


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 400),
    st.floats(-3, 3, allow_nan=False),
    st.text(max_size=6),
    st.lists(st.integers(-2, 500), max_size=3),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.sampled_from(["role", "content", "type"]), st.text(max_size=4), max_size=2),
)
KEYS = st.sampled_from(
    ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream"]
    + ["stream_options", "specdec_method", "logprobs", "model", "bogus"]
)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(
    endpoint=st.sampled_from(["completions", "chat/completions"]),
    body=st.one_of(st.dictionaries(KEYS, VALUES, max_size=6), VALUES),
)
def test_random_bodies_never_5xx(server, endpoint, body):
    r = httpx.post(f"{server.base_url}/v1/{endpoint}", json=body, headers=AUTH, timeout=TIMEOUT)
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert sse_events(r)[-1]["choices"][-1]["finish_reason"] in ("stop", "length")
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert_error(r, 415 if body is None else 400)  # json=None: httpx sends no body and no Content-Type


# --- concurrency, cancellation, the queue -----------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_clients_get_their_solo_results(client, server, ref):
    cases = []
    for i in range(32):
        method = ("pld", "vanilla")[i % 2]
        prompt = PROMPTS[i % len(PROMPTS)]
        chat = i % 3 == 0
        cases.append((method, prompt, chat, i % 4 < 2, 8 + i % 5))
    want = {}
    for method, prompt, chat, _, n in cases:
        p = [{"role": "user", "content": prompt}] if chat else prompt
        want[(method, prompt, chat, n)] = solo(ref, method, p, max_new_tokens=n).text

    def request(case) -> str:
        method, prompt, chat, stream, n = case
        kw = {"model": "tiny", "max_tokens": n, "temperature": 0, "extra_body": {"specdec_method": method}}
        if chat:
            kw["messages"] = [{"role": "user", "content": prompt}]
            if not stream:
                return client.chat.completions.create(**kw).choices[0].message.content
            chunks = client.chat.completions.create(stream=True, **kw)
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        if not stream:
            return client.completions.create(prompt=prompt, **kw).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True, **kw))

    def one_client(pair) -> list[str]:
        return [request(case) for case in pair]

    pairs = [cases[2 * k : 2 * k + 2] for k in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one_client, pairs, timeout=5 * TIMEOUT))
    for pair, texts in zip(pairs, results, strict=True):
        for (method, prompt, chat, _, n), text in zip(pair, texts, strict=True):
            assert text == want[(method, prompt, chat, n)]
    snapshot = server.config.app.state.worker.snapshot()
    assert snapshot["running"] == 0 and snapshot["queued"] == 0


def test_a_client_leaving_mid_stream_does_not_disturb_the_batch(server, client, ref):
    """Clients streaming at once share steps (several generations live together); one leaves after its first
    text chunk: its row is freed (or it finished first), and the others still get their solo results."""
    worker = server.config.app.state.worker
    before = worker.snapshot()
    n = 60  # long enough that the leaver is usually still running when it leaves
    want = {p: solo(ref, "pld", p, max_new_tokens=n).text for p in PROMPTS}
    barrier = threading.Barrier(len(PROMPTS) + 1)

    def stay(prompt: str) -> str:
        kw = {"model": "tiny", "max_tokens": n, "temperature": 0, "extra_body": {"specdec_method": "pld"}}
        barrier.wait(timeout=TIMEOUT)
        return "".join(c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True, **kw))

    def leave() -> None:
        body = {
            "prompt": PROMPTS[0],
            "max_tokens": n,
            "temperature": 0,
            "stream": True,
            "specdec_method": "pld",
        }
        barrier.wait(timeout=TIMEOUT)
        with (
            httpx.Client(base_url=server.base_url, headers=AUTH, timeout=TIMEOUT) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # then the connection closes

    with ThreadPoolExecutor(max_workers=len(PROMPTS) + 1) as pool:
        staying = [pool.submit(stay, p) for p in PROMPTS]
        pool.submit(leave).result(timeout=5 * TIMEOUT)
        texts = [f.result(timeout=5 * TIMEOUT) for f in staying]
    assert texts == [want[p] for p in PROMPTS]
    assert wait_until(lambda: worker.snapshot()["running"] == 0)
    after = worker.snapshot()
    ended = sum(after[k] - before[k] for k in ("completed", "cancelled", "failed"))
    assert ended == len(PROMPTS) + 1 and after["failed"] == before["failed"]
    assert after["peak_running"] > 1  # they were live together


def test_disconnect_mid_stream_cancels_and_server_stays_correct(server, client, ref):
    worker = server.config.app.state.worker
    before = worker.snapshot()
    body = {
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "specdec_method": "gated",
    }
    GATE.clear()
    try:
        with (
            httpx.Client(base_url=server.base_url, headers=AUTH, timeout=TIMEOUT) as c,
            c.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            assert r.status_code == 200
            # the line iterator is held: a generator over it that is dropped closes it, and with it the
            # connection (httpx closes a response whose stream iteration stops early)
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            # the engine thread is mid-generation (held at the gate): the event loop still answers
            assert httpx.get(f"{server.base_url}/health", timeout=TIMEOUT).json()["running"] == 1
        # leaving the block closed the connection after the first chunk
        assert wait_until(lambda: worker.active is not None and worker.active.cancelled.is_set())
    finally:
        GATE.set()
    assert wait_until(lambda: worker.snapshot()["cancelled"] == before["cancelled"] + 1)
    after = worker.snapshot()
    assert after["running"] == after["queued"] == 0 and after["completed"] == before["completed"]
    want = solo(ref, "pld", PROMPTS[0], max_new_tokens=12)
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text


@pytest.mark.slow
def test_non_streaming_client_that_gives_up_cancels_its_generation(server, client, ref):
    worker = server.config.app.state.worker
    before = worker.snapshot()
    body = {"prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0, "specdec_method": "gated"}
    GATE.clear()
    try:
        with pytest.raises(httpx.ReadTimeout):  # the gate holds the generation: no answer can come
            httpx.post(
                f"{server.base_url}/v1/completions",
                json=body,
                headers=AUTH,
                timeout=httpx.Timeout(TIMEOUT, read=1.0),
            )
        assert wait_until(lambda: worker.active is not None and worker.active.cancelled.is_set())
    finally:
        GATE.set()
    assert wait_until(lambda: worker.snapshot()["cancelled"] == before["cancelled"] + 1)
    got = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=9, temperature=0)
    assert got.choices[0].text == solo(ref, "pld", PROMPTS[1], max_new_tokens=9).text


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_non_streaming_client_leaving_while_tokens_flow_cancels_its_generation(server, ref, endpoint):
    """Tokens every 40 ms: the disconnect check once ran only after 0.5 s without one, so it never ran and
    the generation went on to its end. It is cancelled at the next step."""
    worker = server.config.app.state.worker
    before = worker.snapshot()
    body = {"max_tokens": 64, "temperature": 0, "specdec_method": "gated"}
    if endpoint == "completions":
        body["prompt"] = PROMPTS[1]
        assert len(solo(ref, "pld", PROMPTS[1], max_new_tokens=64).token_ids) == 64  # no early EOS
    else:
        body["messages"] = [{"role": "user", "content": PROMPTS[1]}]
        assert len(solo(ref, "pld", body["messages"], max_new_tokens=64).token_ids) == 64
    STEP_SECONDS[0] = 0.04  # 64 tokens: 2.5 s
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.base_url}/v1/{endpoint}",
                json=body,
                headers=AUTH,
                timeout=httpx.Timeout(TIMEOUT, read=0.5),
            )
        left = time.monotonic()
        assert wait_until(lambda: worker.snapshot()["cancelled"] == before["cancelled"] + 1, timeout=TIMEOUT)
        assert time.monotonic() - left < 1.0
    finally:
        STEP_SECONDS[0] = 0.0
    assert worker.snapshot()["completed"] == before["completed"]


@pytest.mark.slow
def test_eos_ends_with_finish_reason_stop(tok):
    from fastapi.testclient import TestClient

    m = tiny.model("llama", dtype=torch.float32)
    prompt = "def f():\n"
    m.generation_config.eos_token_id = tiny.hf_greedy(m, tok(prompt)["input_ids"], 1)[0]  # EOS comes first
    dec = SpecDecoder(m, tok)
    want = dec.generate(prompt, max_new_tokens=10)
    assert want.stats.finish_reason == "eos" and len(want.token_ids) == 1
    with TestClient(create_app(dec)) as c:
        got = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0}).json()
    assert got["choices"][0]["finish_reason"] == "stop" and got["specdec"]["finish_reason"] == "eos"
    assert got["usage"]["completion_tokens"] == 1 and got["choices"][0]["text"] == want.text


def test_queue_limit_and_cancel_before_start(tok):
    """With max_batch 1, max_queued requests may wait behind the running one; more get 503; a cancelled waiting
    job never runs."""
    dec = SpecDecoder(tiny.model("llama"), tok, GatedDrafter())
    params = {"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": []}

    async def scenario():
        worker = EngineWorker(max_queued=1, max_batch=1)
        jobs = [Job(dec, "gated", Prompt(lambda: [5, 6, 7], "prompt", None, 8), params) for _ in range(3)]
        GATE.clear()
        try:
            worker.submit(jobs[0])
            worker.submit(jobs[1])
            with pytest.raises(APIError) as busy:
                worker.submit(jobs[2])
            assert (
                busy.value.status == 503 and worker.snapshot()["queued"] + worker.snapshot()["running"] == 2
            )
            jobs[1].cancel()
        finally:
            GATE.set()
        events = [await asyncio.wait_for(jobs[0].events.get(), TIMEOUT)]
        while not isinstance(events[-1], Finished | Failed):
            events.append(await asyncio.wait_for(jobs[0].events.get(), TIMEOUT))
        assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
        await asyncio.to_thread(wait_until, lambda: worker.snapshot()["cancelled"] == 1)
        assert jobs[1].events.empty()
        assert worker.snapshot() == {
            "running": 0,
            "queued": 0,
            "peak_running": 1,  # max_batch 1: one at a time
            "completed": 1,
            "cancelled": 1,
            "failed": 0,
        }
        worker.shutdown()

    asyncio.run(scenario())


# --- the real command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def serve_command(model_dir, tmp_path_factory):
    """The real `specdec serve` in a subprocess, started with the module so that its imports overlap the
    other tests; only `test_specdec_serve_command` talks to it."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "specdec.cli", "serve", "--model", str(model_dir), "--port", "0"]
    with open(log, "w") as err:
        proc = subprocess.Popen([*cmd, "--threads", "1", "--log-level", "warning"], stderr=err)
    yield proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=TIMEOUT)


@pytest.mark.slow
def test_specdec_serve_command(serve_command, model_dir):
    """`specdec serve` binds loopback, prints where, serves the README's requests, and stops on Ctrl-C."""
    proc, log = serve_command
    try:
        assert wait_until(lambda: "specdec: serving" in log.read_text(), timeout=TIMEOUT), log.read_text()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text()).group(1))
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _healthy(base))
        r = httpx.post(
            f"{base}/v1/completions",
            json={"model": "default", "prompt": "def add(a, b):\n", "max_tokens": 10, "temperature": 0},
            timeout=TIMEOUT,
        )
        want = SpecDecoder.from_pretrained(str(model_dir)).generate("def add(a, b):\n", max_new_tokens=10)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want.text
        assert r.json()["model"] == model_dir.name
        chat = httpx.post(
            f"{base}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            timeout=TIMEOUT,
        )
        assert assert_error(chat, 400)["code"] == "chat_template_missing"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=TIMEOUT)
    # uvicorn stops gracefully, then re-raises SIGINT: KeyboardInterrupt -> exit 130, unless the test runner
    # was started with SIGINT ignored (a background job), which the child inherits -> a plain exit 0
    assert code == 0 or (code == 130 and "specdec: interrupted" in log.read_text())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "argument --port: must be a port number in [0, 65535] (got 70000)"),
        (["--port", "-1"], "argument --port: must be a port number in [0, 65535] (got -1)"),
        (["--port", "http"], "argument --port: expected a port number in [0, 65535], got 'http'"),
        (["--max-batch", "0"], "argument --max-batch: must be >= 1 (got 0)"),
        (["--max-queued", "many"], "argument --max-queued: expected an integer >= 0, got 'many'"),
        (["--max-tokens", "1.5"], "argument --max-tokens: expected an integer >= 1, got '1.5'"),
        (["--host", "no-such-host.invalid", "--port", "0"], "cannot listen on no-such-host.invalid:0"),
        (["--methods", "pld,nope", "--port", "0"], "unknown method 'nope'"),
    ],
)
def test_serve_arguments_are_checked_before_any_model_loads(capsys, argv, message):
    """--port 70000 once loaded the model, then died of an OverflowError traceback. The model here does not
    exist, so each message shows the check ran before loading."""
    assert main(["serve", "--model", "/nonexistent/model", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"specdec: error: {message}"), err


def test_serve_command_errors_are_one_line(capsys, model_dir):
    assert main(["serve", "--model", str(model_dir), "--methods", "pld,nope"]) == 2
    assert capsys.readouterr().err.startswith("specdec: error: unknown method 'nope'")
    with listen("127.0.0.1", 0) as taken:
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", str(model_dir), "--port", port, "--log-level", "warning"]) == 2
        assert capsys.readouterr().err.startswith(f"specdec: error: cannot listen on 127.0.0.1:{port}")
        assert main(["serve", "--model", "/nonexistent/model", "--port", port]) == 2  # before loading, too
        assert capsys.readouterr().err.startswith(f"specdec: error: cannot listen on 127.0.0.1:{port}")


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


# --- structured output: response_format and tools ----------------------------------------------------------

FLAGS = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "kind": {"type": "string", "enum": ["a", "bc"]}},
    "required": ["ok", "kind"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "flag", "parameters": FLAGS}},
    {
        "type": "function",
        "function": {"name": "noop", "parameters": {"type": "object", "additionalProperties": False}},
    },
]


def test_json_schema_response_format_equals_constrained_generate(client, ref):
    from pydantic import BaseModel

    from specdec import Constraint

    class Flags(BaseModel):
        ok: bool
        kind: str

    messages = [{"role": "user", "content": PROMPTS[0]}]
    want = solo(ref, "pld", messages, max_new_tokens=64, constraint=Constraint.json_schema(FLAGS))
    fmt = {"type": "json_schema", "json_schema": {"name": "flags", "schema": FLAGS, "strict": True}}
    kwargs = {
        "model": "tiny",
        "messages": messages,
        "max_tokens": 64,
        "temperature": 0,
        "response_format": fmt,
    }
    got = client.chat.completions.create(**kwargs)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == "stop", want.text  # the schema is small enough to finish
    assert set(json.loads(want.text)) == {"ok", "kind"}
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    parsed = client.chat.completions.parse(
        model="tiny", messages=messages, max_tokens=64, temperature=0, response_format=Flags
    )  # the openai client's own parsing of the schema it sends
    assert isinstance(parsed.choices[0].message.parsed, Flags)
    completion = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=64, temperature=0, extra_body={"response_format": fmt}
    )
    assert set(json.loads(completion.choices[0].text)) == {"ok", "kind"}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "flag"}}])
def test_forced_tool_calls_follow_the_tools_schema(client, choice, stream):
    messages = [{"role": "user", "content": "call a tool"}]
    kwargs = {"model": "tiny", "messages": messages, "max_tokens": 64, "temperature": 0}
    kwargs |= {"tools": TOOLS, "tool_choice": choice}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
        reason = chunks[-1].choices[0].finish_reason
        assert not any(c.choices[0].delta.content for c in chunks)
    else:
        message = client.chat.completions.create(**kwargs).choices[0]
        calls, reason = message.message.tool_calls or [], message.finish_reason
        assert message.message.content is None
    assert reason == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    arguments = json.loads(call.function.arguments)
    if isinstance(choice, dict):
        assert call.function.name == "flag" and set(arguments) == {"ok", "kind"}
    else:
        assert call.function.name in {"flag", "noop"}


def test_auto_tool_choice_answers_in_content_when_the_reply_is_no_call(client, ref):
    messages = [{"role": "user", "content": PROMPTS[2]}]
    want = solo(ref, "pld", messages, max_new_tokens=12)
    got = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, tools=TOOLS
    )
    assert got.choices[0].message.content == want.text and not got.choices[0].message.tool_calls


BAD_STRUCTURED = [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}}, None),
    ({"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, None),
]


@pytest.mark.parametrize("extra,param", BAD_STRUCTURED, ids=[json.dumps(b)[:40] for b, _ in BAD_STRUCTURED])
def test_bad_structured_requests_are_400_in_one_line(server, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=TIMEOUT)
    error = assert_error(r, 400, param)
    assert "\n" not in error["message"]


def _metrics(server) -> dict:
    """{(name, labels as a sorted tuple): value} from /metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{server.base_url}/metrics", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_add_up_to_the_responses(server, client):
    before = _metrics(server)
    replies = [
        client.completions.create(
            model="tiny", prompt=p, max_tokens=12, temperature=0, extra_body={"specdec_method": m}
        )
        for p, m in zip(PROMPTS, ["pld", "pld", "vanilla", "pld"], strict=True)
    ]
    after = _metrics(server)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("specdec_requests_total", outcome="completed") == len(replies)
    assert grew("specdec_generation_tokens_total") == sum(r.usage.completion_tokens for r in replies)
    assert grew("specdec_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in replies)
    for method in ("pld", "vanilla"):
        mine = [r for r in replies if r.model_extra["specdec"]["method"] == method]
        forwards = sum(r.model_extra["specdec"]["target_forwards"] for r in mine)
        assert grew("specdec_target_forwards_total", method=method) == forwards
        accepted = sum(r.usage.completion_tokens - r.model_extra["specdec"]["target_forwards"] for r in mine)
        assert grew("specdec_accepted_draft_tokens_total", method=method) == accepted
        assert grew("specdec_tau_count", method=method) == len(mine)
    assert grew("specdec_time_to_first_token_seconds_count") == len(replies)
    assert grew("specdec_queue_seconds_count") == len(replies)
    assert ("specdec_running", ()) in after and ("specdec_queued", ()) in after
    cached = sum(r.model_extra["specdec"]["cached_prompt_tokens"] for r in replies)
    assert grew("specdec_cached_prompt_tokens_total") == cached
    assert ("specdec_prefix_cache_bytes", ()) in after and ("specdec_prefix_cache_hit_ratio", ()) in after


def test_a_repeated_history_is_served_from_the_prefix_cache_and_answers_as_before(client, ref):
    history = [{"role": "user", "content": PROMPTS[2] * 6}]
    kwargs = {"model": "tiny", "max_tokens": 12, "temperature": 0, "extra_body": {"specdec_method": "pld"}}
    first = client.chat.completions.create(messages=history, **kwargs)
    turn = history + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "again"},
    ]
    second = client.chat.completions.create(messages=turn, **kwargs)
    assert second.model_extra["specdec"]["cached_prompt_tokens"] >= 16
    assert second.choices[0].message.content == solo(ref, "pld", turn, max_new_tokens=12).text
