"""tests/python/test_server_lora.py — LoRA adapters through `mneme serve`: --lora at start-up,
/v1/adapters (load, list, unload), `model` as the adapter in OpenAI requests, sessions bound to
an adapter, and sessions under an adapter surviving a restart.

Adapters are synthetic (tools/gen_lora.py) for the real model's shape: small ranks on two
targets each, with B large enough that greedy output visibly differs from the base model.
Every check runs against the real server over a real socket; OpenAI requests use the
official `openai` client."""
from __future__ import annotations

import http.client
import importlib.util
import json
import subprocess
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="pip install openai (tools/setup.sh installs it)")

from server_util import WS, Server  # noqa: E402

S = "/v1/sessions"
SYSTEM = "You are a terse assistant."
QUESTION = "Name a colour."


@pytest.fixture(scope="module")
def gen_lora(repo_root):
    spec = importlib.util.spec_from_file_location("gen_lora", repo_root / "tools" / "gen_lora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def adapters(gen_lora, model_path, tmp_path_factory):
    """name -> path: a (r 4, q/v), a.gguf (a as a GGUF LoRA), b (r 8, o/up), c (r 4, k/down;
    loaded by request), bad (truncated: written by gen_lora.py --break)."""
    d = tmp_path_factory.mktemp("adapters")
    shape = gen_lora.model_shape(str(model_path))
    vals = gen_lora.generate(str(d / "a"), shape, r=4, targets=("q_proj", "v_proj"), seed=3, std_b=0.3)
    gen_lora.to_gguf(vals, shape, str(d / "a.gguf"), alpha=8.0)   # the same adapter as a llama.cpp GGUF LoRA
    gen_lora.generate(str(d / "b"), shape, r=8, targets=("o_proj", "up_proj"), seed=4, std_b=0.2)
    gen_lora.generate(str(d / "c"), shape, r=4, targets=("k_proj", "down_proj"), seed=5, std_b=0.2)
    gen_lora.generate(str(d / "bad"), shape, r=4, targets=("q_proj",), seed=6, brk="truncate")
    return {k: d / k for k in ("a", "b", "c", "bad", "a.gguf")}


@pytest.fixture(scope="module")
def server(mneme_bin, model_path, adapters):
    s = Server(mneme_bin, model_path, "--lora", f"a={adapters['a']}", "--lora", f"b={adapters['b']}")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, model, n=12, stream=False):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0)
        assert r.model == model
        return r.choices[0].message.content
    chunks = client.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def session_reply(server, adapter, n=12):
    body = {"system": SYSTEM} if adapter is None else {"system": SYSTEM, "adapter": adapter}
    s = server.json("POST", S, body)
    assert s["adapter"] == adapter
    sid = s["id"]
    server.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": QUESTION})
    r = server.json("POST", f"{S}/{sid}/generate", {"max_tokens": n, "temperature": 0, "stream": False})
    got = server.json("GET", f"{S}/{sid}")
    assert got["adapter"] == adapter
    server.json("DELETE", f"{S}/{sid}")
    return r["text"]


def test_models_list_base_and_adapters(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [server.model, "a", "b"]
    m = server.json("GET", "/v1/models/a")
    assert m["id"] == "a" and m["parent"] == server.model
    assert "parent" not in server.json("GET", f"/v1/models/{server.model}")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_adapter_output_differs_from_base_and_equals_session(server, client):
    base = chat(client, server.model)
    a, b = chat(client, "a"), chat(client, "b")
    assert a != base and b != base and a != b, (base, a, b)
    # no model at all is the base model too
    r = client.completions.create(model=server.model, prompt="Hi", max_tokens=4, temperature=0)
    st, data, _ = server.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 0})
    assert st == 200 and r.choices[0].text in data.decode()
    # the same adapter through a session gives the same tokens as through `model`
    assert session_reply(server, "a") == a
    assert session_reply(server, None) == base
    assert chat(client, "a", stream=True) == a


def test_websocket_on_an_adapter_session(server, client):
    """The WebSocket generates with the session's adapter; a frame naming another is refused."""
    sid = server.json("POST", S, {"system": SYSTEM, "adapter": "b"})["id"]
    ws = WS(server.port, f"{S}/{sid}/stream")
    try:
        assert ws.status == 101 and ws.recv()["adapter"] == "b"
        ws.send({"type": "append", "role": "user", "content": QUESTION})
        assert ws.recv()["type"] == "appended"
        ws.send({"type": "generate", "max_tokens": 12, "temperature": 0, "model": "a"})
        m = ws.recv()
        assert m["type"] == "error" and "cannot change its adapter" in m["error"]["message"]
        ws.send({"type": "generate", "max_tokens": 12, "temperature": 0})
        text = ""
        while (m := ws.recv())["type"] == "token":
            text += m["text"]
        assert m["type"] == "done", m
    finally:
        ws.close()
    assert text == chat(client, "b")
    server.json("DELETE", f"{S}/{sid}")


def test_three_concurrent_streams_equal_alone(server, client):
    models = ["a", "b", server.model]
    alone = {m: chat(client, m, n=16) for m in models}
    got = {}
    errors = []

    def run(m):
        try:
            got[m] = chat(client, m, n=16, stream=True)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert got == alone


def test_adapter_load_list_unload(server, client, adapters):
    A = "/v1/adapters"
    c = server.json("POST", A, {"name": "c", "path": str(adapters["c"])})
    assert c["id"] == "c" and c["rank"] == 4 and c["targets"] == ["k_proj", "down_proj"]
    assert c["residency"] == "host" and c["bytes"] > 0 and c["sessions"] == 0 and c["parent"] == server.model
    listed = {x["id"]: x for x in server.json("GET", A)["data"]}
    assert set(listed) == {"a", "b", "c"} and listed["b"]["ranks"] == {"o_proj": 8, "up_proj": 8}
    assert server.json("GET", f"{A}/c") == listed["c"]
    assert listed["a"]["fingerprint"] != listed["c"]["fingerprint"]
    # the same content as a GGUF LoRA file: same fingerprint, same output
    g = server.json("POST", A, {"name": "a-gguf", "path": str(adapters["a.gguf"])})
    assert g["fingerprint"] == listed["a"]["fingerprint"] and g["ranks"] == listed["a"]["ranks"]
    assert chat(client, "a-gguf") == chat(client, "a")
    server.json("DELETE", f"{A}/a-gguf")
    assert chat(client, "c", n=4)

    def err(method, path, body, status):
        st, data, _ = server.request(method, path, body)
        assert st == status, (method, path, st, data)
        return json.loads(data)["error"]

    assert "already loaded" in err("POST", A, {"name": "c", "path": str(adapters["a"])}, 409)["message"]
    assert "base model" in err("POST", A, {"name": server.model, "path": str(adapters["a"])}, 409)["message"]
    e = err("POST", A, {"name": "x", "path": str(adapters["c"] / "nowhere")}, 400)
    assert e["param"] == "path" and "nowhere" in e["message"]
    e = err("POST", A, {"name": "x", "path": str(adapters["bad"])}, 400)
    assert "adapter_model.safetensors" in e["message"] and e["param"] == "path"
    assert err("POST", A, {"path": str(adapters["c"])}, 400)["param"] == "name"
    assert err("POST", A, {"name": "a/b", "path": str(adapters["c"])}, 400)["param"] == "name"
    assert err("POST", A, {"name": "y"}, 400)["param"] == "path"
    assert err("DELETE", f"{A}/nope", None, 404)
    assert err("PUT", A, None, 405)
    assert err("GET", f"{A}/nope", None, 404)
    for bad, param in (({"name": 3, "path": "x"}, "name"), ({"name": "x", "path": ["x"]}, "path"),
                       ({"name": "", "path": "x"}, "name"), ({"name": "x" * 200, "path": "x"}, "name"),
                       ({"name": "x", "path": ""}, "path"), ([1], None)):
        assert err("POST", A, bad, 400)["param"] == param, bad
    assert err("POST", S, {"adapter": 7}, 400)["param"] == "adapter"
    assert err("POST", "/v1/completions", {"model": "", "prompt": "x"}, 404)["code"] == "model_not_found"
    assert "x" not in {x["id"] for x in server.json("GET", A)["data"]}
    with pytest.raises(openai.NotFoundError) as ex:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ex.value.body["code"] == "model_not_found"
    assert err("POST", S, {"adapter": "nope"}, 404)["param"] == "adapter"

    # a session bound to c: unload refused while it exists, unless forced
    sid = server.json("POST", S, {"adapter": "c"})["id"]
    server.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": QUESTION})
    assert {x["id"]: x for x in server.json("GET", A)["data"]}["c"]["sessions"] == 1
    e = err("POST", f"{S}/{sid}/generate", {"model": "a", "max_tokens": 2, "stream": False}, 400)
    assert "cannot change its adapter" in e["message"]
    e = err("DELETE", f"{A}/c", None, 409)
    assert e["code"] == "adapter_in_use" and "1 session" in e["message"]
    assert err("DELETE", f"{A}/c?force=maybe", None, 400)["param"] == "force"
    gone = server.json("DELETE", f"{A}/c?force=true")
    assert gone["deleted"] is True and gone["sessions_stranded"] == 1
    e = err("POST", f"{S}/{sid}/generate", {"max_tokens": 2, "stream": False}, 409)
    assert e["code"] == "adapter_unloaded" and "'c' is no longer loaded" in e["message"]
    server.json("DELETE", f"{S}/{sid}")
    assert [m.id for m in client.models.list().data] == [server.model, "a", "b"]
    _, metrics, _ = server.request("GET", "/metrics")
    assert b"\nmneme_adapters_loaded 2\n" in metrics
    # the other adapters are untouched
    assert chat(client, "a") == chat(client, "a", stream=True)


def test_bad_lora_at_startup_exits_with_the_loaders_message(mneme_bin, model_path, adapters):
    r = subprocess.run([str(mneme_bin), "serve", "-m", str(model_path), "--port", "0", "-t", "1",
                        "--lora", f"x={adapters['bad']}"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--lora x=" in r.stderr and "adapter_model.safetensors" in r.stderr, r.stderr
    r = subprocess.run([str(mneme_bin), "serve", "-m", str(model_path), "--lora", "noequals"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "NAME=PATH" in r.stderr


def test_adapter_session_survives_restart(mneme_bin, model_path, adapters, tmp_path):
    d = tmp_path / "persist"
    d.mkdir()
    lora_a = ("--lora", f"a={adapters['a']}")
    srv = Server(mneme_bin, model_path, "--persist-dir", str(d), *lora_a)
    try:
        sid = srv.json("POST", S, {"system": SYSTEM, "adapter": "a"})["id"]
        srv.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": QUESTION})
        fork = srv.json("POST", f"{S}/{sid}/fork", {})["id"]
        assert srv.json("GET", f"{S}/{fork}")["adapter"] == "a"
        ref = srv.json("POST", f"{S}/{fork}/generate", {"max_tokens": 6, "temperature": 0, "stream": False})["text"]
        srv.json("DELETE", f"{S}/{fork}")
        before = srv.json("GET", f"{S}/{sid}")["tokens"]
    finally:
        rc = srv.stop()
    assert rc == 0, srv.stderr()
    assert "1 sessions saved" in srv.stderr()

    # without the adapter the engine refuses the file: it is kept, and reported
    srv2 = Server(mneme_bin, model_path, "--persist-dir", str(d), "--lora", f"b={adapters['b']}")
    try:
        assert f"session {sid} not loaded" in srv2.stderr() and "adapter" in srv2.stderr()
        assert f"made under adapter 'a' from {adapters['a']}: start with --lora a={adapters['a']}" in srv2.stderr()
        st, _, _ = srv2.request("GET", f"{S}/{sid}")
        assert st == 404
    finally:
        srv2.close()
    assert (d / f"saved-{sid}.mns").is_file()

    srv3 = Server(mneme_bin, model_path, "--persist-dir", str(d), *lora_a)
    try:
        assert "1 sessions loaded" in srv3.stderr()
        got = srv3.json("GET", f"{S}/{sid}")
        assert got["adapter"] == "a" and got["tokens"] == before
        r = srv3.json("POST", f"{S}/{sid}/generate", {"max_tokens": 6, "temperature": 0, "stream": False})
        assert r["text"] == ref
        st, data, _ = srv3.request("DELETE", "/v1/adapters/a")
        assert st == 409, data
    finally:
        srv3.close()


def test_running_request_holds_its_adapter(server, adapters):
    """A streaming OpenAI request's temporary session counts as a user: unload is 409 while it
    runs, and succeeds once the client has gone (its generation is cancelled)."""
    server.json("POST", "/v1/adapters", {"name": "held", "path": str(adapters["c"])})
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", "/v1/completions", json.dumps({"model": "held", "prompt": "Once upon a time",
                                                      "max_tokens": 2000, "temperature": 0, "stream": True}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    while not r.fp.readline().startswith(b"data: "):
        pass
    st, data, _ = server.request("DELETE", "/v1/adapters/held")
    assert st == 409 and b"adapter_in_use" in data, data
    c.close()
    end = time.time() + 10
    while (st := server.request("DELETE", "/v1/adapters/held")[0]) == 409 and time.time() < end:
        time.sleep(0.05)
    assert st == 200

    # forced while a stream runs: the stream ends with the error, the server goes on
    server.json("POST", "/v1/adapters", {"name": "held", "path": str(adapters["c"])})
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", "/v1/completions", json.dumps({"model": "held", "prompt": "Once upon a time",
                                                      "max_tokens": 2000, "temperature": 0, "stream": True}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    while not r.fp.readline().startswith(b"data: "):
        pass
    assert server.json("DELETE", "/v1/adapters/held?force=true")["sessions_stranded"] == 1
    rest = ""   # raw chunked framing read line by line: enough to find the events
    while "data: [DONE]" not in rest and (line := r.fp.readline()):
        rest += line.decode()
    c.close()
    assert '"code":"adapter_unloaded"' in rest and "'held' was unloaded during this request" in rest, rest[-500:]
    assert "data: [DONE]" in rest
