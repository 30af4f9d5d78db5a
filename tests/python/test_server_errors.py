"""tests/python/test_server_errors.py — malformed HTTP, JSON and parameters against a real
`mneme serve`: every case gets its status, the OpenAI error shape, a message naming the
problem and (for fields) `param`. The server must keep serving after all of them."""
from __future__ import annotations

import json
import socket
import time

import pytest

from server_util import Server

C, CH, S = "/v1/completions", "/v1/chat/completions", "/v1/sessions"
UNKNOWN = "0123456789abcdef0123456789abcdef"
MSG = [{"role": "user", "content": "hi"}]


def comp(**kw):
    return dict({"prompt": "x", "max_tokens": 1}, **kw)


def chat(**kw):
    return dict({"messages": MSG, "max_tokens": 1}, **kw)


# (method, path, body, status, message substring, param)
CASES = [
    ("GET", "/nope", None, 404, "unknown route GET /nope", None),
    ("GET", "/v1/nope", None, 404, "unknown route", None),
    ("DELETE", C, None, 405, "method not allowed", None),
    ("GET", CH, None, 405, "method not allowed", None),
    ("POST", "/v1/models", "{}", 405, "method not allowed", None),
    ("POST", "/health", "{}", 405, "method not allowed", None),
    ("PUT", S, "{}", 405, "method not allowed", None),
    ("GET", "/v1/models/other-model", None, 404, "does not exist", "model"),
    ("POST", C, "{", 400, "malformed JSON at line 1, column 1", None),
    ("POST", C, '{"prompt": "x",\n "max_tokens": }', 400, "malformed JSON at line 2", None),
    ("POST", C, "", 400, "malformed JSON", None),
    ("POST", C, "[1, 2]", 400, "must be a JSON object", None),
    ("POST", C, '{"prompt": "a", "prompt": "b"}', 400, "duplicate", None),
    ("POST", C, b'{"prompt": "\xff\xfe"}', 400, "malformed JSON", None),
    ("POST", C, "[" * 5000 + "]" * 5000, 400, "malformed JSON", None),
    ("POST", C, comp(max_tokens="a"), 400, "'max_tokens' must be an integer, got a string", "max_tokens"),
    ("POST", C, comp(max_tokens=0), 400, "'max_tokens' must be in [1,", "max_tokens"),
    ("POST", C, comp(max_tokens=-5), 400, "got -5", "max_tokens"),
    ("POST", C, comp(max_tokens=1.5), 400, "must be an integer", "max_tokens"),
    ("POST", C, comp(max_tokens=8192), 400, "max_tokens 8192 exceed the context length", "max_tokens"),
    ("POST", C, comp(temperature=3), 400, "'temperature' must be in [0, 2], got 3", "temperature"),
    ("POST", C, comp(temperature="hot"), 400, "'temperature' must be a number", "temperature"),
    ("POST", C, comp(top_p=0), 400, "'top_p' must be in (0, 1]", "top_p"),
    ("POST", C, comp(top_p=1.5), 400, "'top_p' must be in", "top_p"),
    ("POST", C, comp(frequency_penalty=5), 400, "'frequency_penalty' must be in [-2, 2]", "frequency_penalty"),
    ("POST", C, comp(presence_penalty=-3), 400, "'presence_penalty' must be in", "presence_penalty"),
    ("POST", C, comp(stop=5), 400, "'stop' must be a string or an array", "stop"),
    ("POST", C, comp(stop=["a", 1]), 400, "'stop[1]' must be a non-empty string", "stop"),
    ("POST", C, comp(stop=""), 400, "'stop' must not be empty", "stop"),
    ("POST", C, comp(stop=["s%d" % i for i in range(17)]), 400, "at most 16", "stop"),
    ("POST", C, comp(n=2), 400, "'n' must be in [1, 1]", "n"),
    ("POST", C, comp(stream="yes"), 400, "'stream' must be a boolean", "stream"),
    ("POST", C, comp(stream_options=5), 400, "'stream_options' must be an object", "stream_options"),
    ("POST", C, comp(stream_options={"include_usage": 1}), 400, "must be a boolean", "stream_options.include_usage"),
    ("POST", C, comp(logprobs=30), 400, "'logprobs' must be in [0, 20]", "logprobs"),
    ("POST", C, comp(seed="x"), 400, "'seed' must be an integer", "seed"),
    ("POST", C, comp(echo=True), 400, "'echo' is not supported", "echo"),
    ("POST", C, comp(model="gpt-4"), 404, "The model 'gpt-4' does not exist", "model"),
    ("POST", C, {"max_tokens": 1}, 400, "'prompt' is required", "prompt"),
    ("POST", C, comp(prompt=5), 400, "'prompt' must be a string or an array", "prompt"),
    ("POST", C, comp(prompt=[-1]), 400, "'prompt[0]' must be a token id", "prompt"),
    ("POST", C, comp(prompt=[1, 99999999]), 400, "'prompt[1]' must be a token id", "prompt"),
    ("POST", C, comp(prompt=["a", "b"]), 400, "only one prompt", "prompt"),
    ("POST", CH, {"max_tokens": 1}, 400, "'messages' is required", "messages"),
    ("POST", CH, chat(messages="hi"), 400, "'messages' must be an array", "messages"),
    ("POST", CH, chat(messages=[]), 400, "'messages' must not be empty", "messages"),
    ("POST", CH, chat(messages=["x"]), 400, "'messages[0]' must be an object", "messages[0]"),
    ("POST", CH, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "must be one of", "messages[0].role"),
    ("POST", CH, chat(messages=[{"content": "x"}]), 400, "'messages[0].role' must be a string", "messages[0].role"),
    ("POST", CH, chat(messages=MSG + [{"role": "user"}]), 400, "'messages[1].content' must be a string",
     "messages[1].content"),
    ("POST", CH, chat(messages=[{"role": "user", "content": 5}]), 400, "must be a string or an array of text parts",
     "messages[0].content"),
    ("POST", CH, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "must be a text part",
     "messages[0].content"),
    ("POST", CH, chat(top_logprobs=3), 400, "'top_logprobs' needs 'logprobs'", "top_logprobs"),
    ("POST", CH, chat(logprobs=True, top_logprobs=21), 400, "'top_logprobs' must be in [0, 20]", "top_logprobs"),
    ("POST", CH, chat(logprobs="yes"), 400, "'logprobs' must be a boolean", "logprobs"),
    ("GET", S + "/zzz", None, 404, "session 'zzz' not found", None),
    ("GET", S + "/" + UNKNOWN, None, 404, "not found", None),
    ("DELETE", S + "/" + UNKNOWN, None, 404, "not found", None),
    ("POST", S + "/" + UNKNOWN + "/messages", {"role": "user", "content": "x"}, 404, "not found", None),
    ("POST", S + "/" + UNKNOWN + "/generate", {"max_tokens": 2}, 404, "not found", None),
    ("POST", S + "/" + UNKNOWN + "/bogus", {}, 404, "unknown route", None),
    ("GET", S + "/" + UNKNOWN + "/generate", None, 405, "method not allowed", None),
    ("POST", S, {"system": 5}, 400, "'system' must be a string", "system"),
    ("POST", S + "/" + UNKNOWN + "/messages", {"role": "user"}, 400, "exactly one of 'content'", "content"),
    ("POST", S + "/" + UNKNOWN + "/messages", {"role": "king", "content": "x"}, 400, "'role' must be one of", "role"),
    ("POST", S + "/" + UNKNOWN + "/messages", {"tokens": [1, "a"]}, 400, "'tokens[1]' must be a token id", "tokens"),
    ("POST", S + "/" + UNKNOWN + "/rewind", {}, 400, "'n_tokens' is required", "n_tokens"),
    ("POST", S + "/" + UNKNOWN + "/rewind", {"n_tokens": -1}, 400, "'n_tokens' must be in", "n_tokens"),
    ("POST", S + "/import", b"not a session file", 400, "", "body"),
]


@pytest.fixture(scope="module")
def server(mneme_bin, model_path):
    s = Server(mneme_bin, model_path, "--max-body", "65536", "--max-streams", "1")
    yield s
    s.close()


@pytest.mark.parametrize("method,path,body,status,msg,param", CASES,
                         ids=[f"{i}-{c[0]}-{c[1].rsplit('/', 1)[-1]}" for i, c in enumerate(CASES)])
def test_error_case(server, method, path, body, status, msg, param):
    if isinstance(body, dict):
        body = json.dumps(body)
    got, data, headers = server.request(method, path, body)
    assert got == status, f"{method} {path} {body!r:.80}: {got} {data[:300]!r}"
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert msg in err["message"], err
    assert err["param"] == param, err
    if status == 405:
        assert "allow" in headers


def test_enough_cases():
    assert len(CASES) >= 30


def test_body_too_large(server):
    got, data, _ = server.request("POST", C, json.dumps(comp(prompt="x" * 100000)))
    assert got == 413
    assert "error" in json.loads(data)


def test_malformed_http(server):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
    data = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        data += d
    s.close()
    assert data.startswith(b"HTTP/1.1 400")


def test_over_capacity_429(server):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    body = json.dumps(comp(prompt="Once upon a time", max_tokens=500, stream=True, temperature=0))
    s.sendall(f"POST {C} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    got, data, headers = server.request("POST", CH, chat())
    assert got == 429 and headers.get("retry-after") == "1"
    assert "too many generations" in json.loads(data)["error"]["message"]
    s.close()
    end = time.time() + 10
    while json.loads(server.request("GET", "/health")[1])["streams"] and time.time() < end:
        time.sleep(0.05)
    assert json.loads(server.request("GET", "/health")[1])["streams"] == 0


def test_still_serving(server):
    r = server.json("POST", C, comp(prompt="Hello", max_tokens=2, temperature=0))
    assert r["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("args,code,msg", [
    (["--port", "99999"], 2, "out of range"),
    (["--bogus"], 2, "unknown option '--bogus'"),
    (["--api-key-file", "/nonexistent/keys"], 2, "--api-key-file /nonexistent/keys"),
    (["--persist-dir", "/nonexistent/dir"], 1, "not a writable directory"),
    (["--host", "not-an-address"], 1, ""),
])
def test_serve_refuses_bad_flags(mneme_bin, model_path, args, code, msg):
    import subprocess
    p = subprocess.run([str(mneme_bin), "serve", "-m", str(model_path), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == code, p.stderr
    assert msg in p.stderr


def test_overlong_api_key_is_refused(mneme_bin, model_path, tmp_path):
    """A key longer than the reader's line is an error, never two keys (its tail would
    otherwise become a valid key of its own)."""
    import subprocess
    keys = tmp_path / "keys"
    keys.write_text("k" * 1500 + "\n")
    p = subprocess.run([str(mneme_bin), "serve", "-m", str(model_path), "--api-key-file", str(keys), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "key 1 is longer than" in p.stderr, p.stderr


def test_prompt_longer_than_context_is_400(server):
    status, body, _ = server.request("POST", C, comp(prompt=[1] * 9000, max_tokens=1))
    assert status == 400, body
    err = json.loads(body)["error"]
    assert err["param"] == "prompt" and "more than the context length" in err["message"], err


def test_port_in_use(mneme_bin, model_path, server):
    import subprocess
    p = subprocess.run([str(mneme_bin), "serve", "-m", str(model_path), "--port", str(server.port)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "mneme serve:" in p.stderr, p.stderr


def test_random_bodies_never_hurt_the_server(server):
    """Random values of random types in every field: each answer is 200 or a 4xx in the
    error shape, and the server keeps serving (nothing a client sends can crash it)."""
    import random
    rnd = random.Random(1234)
    values = [None, True, False, 0, -1, 1, 2, 0.5, 1e308, -1e308, 2 ** 63, "", "x", "\u00e9\U0001F600", [], [1], ["a"],
              [{}], {}, {"role": "user"}, [[1, 2]], [{"role": "user", "content": "hi"}], {"include_usage": True}]
    fields = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
              "stop", "seed", "n", "stream", "stream_options", "logprobs", "top_logprobs", "frequency_penalty",
              "presence_penalty", "model", "echo", "role", "content", "tokens", "system", "n_tokens", "type"]
    sid = server.json("POST", S, {})["id"]
    routes = [C, CH, S, f"{S}/{sid}/messages", f"{S}/{sid}/generate", f"{S}/{sid}/rewind"]
    for i in range(150):
        body = {f: rnd.choice(values) for f in rnd.sample(fields, rnd.randint(0, 6))}
        body["max_tokens"] = rnd.choice([1, 2, "x", -3])   # keep generations short
        body.pop("max_completion_tokens", None)
        route = rnd.choice(routes)
        st, data, _ = server.request("POST", route, json.dumps(body))
        if st >= 400:
            assert 400 <= st < 500, (route, body, st, data[:300])
            assert "error" in json.loads(data), data
        else:
            assert st == 200, (route, body, st, data[:300])
            if route == f"{S}/{sid}/rewind" or len(json.loads(server.request("GET", f"{S}/{sid}")[1])["tokens"]) > 1000:
                server.json("POST", f"{S}/{sid}/rewind", {"n_tokens": 0})
    assert server.json("GET", "/health")["status"] == "ok"
    server.json("DELETE", f"{S}/{sid}")


def test_kv_pool_full_is_503_and_server_goes_on(mneme_bin, model_path):
    """A pool that fills up while generating is 503 (retryable); a prompt larger than the whole
    pool (6 blocks of 16 = 96 tokens) is 400 naming both sizes: a retry could never succeed."""
    srv = Server(mneme_bin, model_path, "--kv-blocks", "6")
    try:
        got, data, headers = srv.request("POST", C, comp(prompt="hello world " * 30, max_tokens=60, temperature=0))
        assert got == 503 and headers.get("retry-after") == "1", data
        err = json.loads(data)["error"]
        assert err["code"] == "over_capacity" and "kv pool full" in err["message"]
        got, data, headers = srv.request("POST", C, comp(prompt="hello world " * 100, max_tokens=4))
        assert got == 400 and "retry-after" not in headers, data
        err = json.loads(data)["error"]
        assert err["code"] == "kv_pool_exceeded" and err["param"] == "prompt", err
        assert "(201 tokens)" in err["message"] and "(96 tokens: 6 blocks of 16)" in err["message"], err
        got, data, _ = srv.request("POST", CH, {"messages": [{"role": "user", "content": "hi " * 120}], "max_tokens": 1})
        err = json.loads(data)["error"]
        assert got == 400 and err["param"] == "messages" and "96 tokens" in err["message"], data
        assert srv.json("POST", C, comp(prompt="hello", max_tokens=2))["usage"]["completion_tokens"] == 2
        # a session append past the whole pool is refused up front and leaves the session as it was
        sid = srv.json("POST", S, {})["id"]
        srv.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "hello there"})
        n0 = srv.json("GET", f"{S}/{sid}")["n_tokens"]
        for body, param in (({"role": "user", "content": "hi " * 120}, "content"),
                            ({"role": "user", "tokens": [100] * 97}, "tokens")):
            got, data, _ = srv.request("POST", f"{S}/{sid}/messages", body)
            err = json.loads(data)["error"]
            assert got == 400 and err["code"] == "kv_pool_exceeded" and err["param"] == param, data
            assert "96 tokens: 6 blocks of 16" in err["message"] and "nothing was appended" in err["message"], data
            assert srv.json("GET", f"{S}/{sid}")["n_tokens"] == n0
        r = srv.json("POST", f"{S}/{sid}/generate", {"max_tokens": 3, "temperature": 0, "stream": False})
        assert r["text"] is not None
    finally:
        srv.close()
