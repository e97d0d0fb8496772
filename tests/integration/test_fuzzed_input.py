"""Malformed chat and completions requests, sent raw over HTTP: each gets an OpenAI-style 4xx
(a JSON body with a message) and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "hello"}]


def chat(**fields):
    return ("chat/completions", {"model": "MODEL", "messages": HELLO, "max_tokens": 4, **fields})


def completion(**fields):
    return ("completions", {"model": "MODEL", "prompt": "hello", "max_tokens": 4, **fields})


DROP = object()


def without(kind: str, field: str):
    path, body = chat() if kind == "chat" else completion()
    body.pop(field)
    return path, body


# name -> (path, body: dict to send as JSON, or bytes to send raw, content type)
CASES: dict[str, tuple] = {
    "invalid json": ("chat/completions", b'{"model": "MODEL", "messages": [', "application/json"),
    "empty body": ("chat/completions", b"", "application/json"),
    "json array body": ("chat/completions", b"[1, 2, 3]", "application/json"),
    "json string body": ("chat/completions", b'"hello"', "application/json"),
    "not utf-8": ("chat/completions", b'{"model": "\xff\xfe", "messages": []}', "application/json"),
    "form content type": ("chat/completions", b"model=MODEL&messages=hello", "application/x-www-form-urlencoded"),
    "messages missing": (*without("chat", "messages"), None),
    "messages a string": (*chat(messages="hello"), None),
    "messages empty": (*chat(messages=[]), None),
    "message without role": (*chat(messages=[{"content": "hi"}]), None),
    "message role unknown": (*chat(messages=[{"role": "wizard", "content": "hi"}]), None),
    "message content a number": (*chat(messages=[{"role": "user", "content": 42}]), None),
    "message a string": (*chat(messages=["hello"]), None),
    "max_tokens negative": (*chat(max_tokens=-5), None),
    "max_tokens a word": (*chat(max_tokens="ten"), None),
    "max_tokens absurd": (*chat(max_tokens=10**12), None),
    "max_tokens a float": (*chat(max_tokens=3.5), None),
    "temperature negative": (*chat(temperature=-1.0), None),
    "temperature a word": (*chat(temperature="hot"), None),
    "top_p above one": (*chat(top_p=1.5), None),
    "top_p negative": (*chat(top_p=-0.1), None),
    "n zero": (*chat(n=0), None),
    "presence_penalty out of range": (*chat(presence_penalty=5.0), None),
    "frequency_penalty out of range": (*chat(frequency_penalty=-5.0), None),
    "top_logprobs too many": (*chat(logprobs=True, top_logprobs=10_000), None),
    "seed a word": (*chat(seed="lucky"), None),
    "stop a number": (*chat(stop=7), None),
    "stream a word": (*chat(stream="yes please"), None),
    "request_class unknown": (*chat(request_class="urgent"), None),
    "model a list": (*chat(model=["a", "b"]), None),
    "model unknown": (*chat(model="no-such-model"), None),
    "model a number": (*chat(model=12), None),
    "prompt beyond the context": (*chat(messages=[{"role": "user", "content": "word " * 200_000}]), None),
    "response_format unknown": (*chat(response_format={"type": "telepathy"}), None),
    "tools malformed": (*chat(tools=[{"type": "function"}]), None),
    "completions prompt missing": (*without("completions", "prompt"), None),
    "completions prompt a dict": (*completion(prompt={"text": "hi"}), None),
    "completions max_tokens negative": (*completion(max_tokens=-1), None),
    "completions n a word": (*completion(n="many"), None),
    "wrong method": ("chat/completions", None, "GET"),
    "completions logprobs too many": (*completion(logprobs=10_000), None),
}


def _send(client: httpx.Client, model: str, path: str, body, content_type: str | None) -> httpx.Response:
    if body is None:  # a method the route does not have
        return client.request(content_type, path)
    if isinstance(body, bytes):
        raw = body.replace(b"MODEL", model.encode())
        return client.post(path, content=raw, headers={"content-type": content_type})
    text = json.dumps(body).replace('"MODEL"', json.dumps(model))
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def _message(resp: httpx.Response) -> str | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    err = body.get("error", body)
    return err.get("message") if isinstance(err, dict) else None


def test_every_malformed_request_gets_an_openai_style_4xx_and_the_server_keeps_serving(stack):
    assert len(CASES) >= 30
    wrong = {}
    with httpx.Client(base_url=stack["endpoint"] + "/", timeout=120) as client:
        for name, (path, body, content_type) in CASES.items():
            resp = _send(client, stack["model"], path, body, content_type)
            message = _message(resp)
            if not (400 <= resp.status_code < 500) or not message:
                wrong[name] = (resp.status_code, resp.text[:300])
        # And the server still answers a good request.
        ok = client.post("chat/completions", json={"model": stack["model"], "messages": HELLO, "max_tokens": 4})
    assert not wrong, json.dumps(wrong, indent=1)
    assert ok.status_code == 200, ok.text[:500]
    assert ok.json()["choices"][0]["message"]["content"] is not None
