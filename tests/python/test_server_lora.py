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
import os
import signal
import subprocess
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="pip install openai (tools/setup.sh installs it)")

from server_util import WS, Server, metric  # noqa: E402

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
    s = Server(mneme_bin, model_path, "--lora", f"a={adapters['a']}", "--lora", f"b={adapters['b']}",
               "--lora-dir", str(adapters["a"].parent))
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


def open_fifo_writer(fifo, timeout=20.0):
    """Wait until a reader (the adapter loader) has the FIFO open; return a write descriptor."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.02)
    raise AssertionError("the load never opened adapter_config.json")


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
    e = err("POST", A, {"name": "x", "path": str(adapters["c"] / "nowhere")}, 403)
    assert e["param"] == "path" and "nowhere" in e["message"] and e["code"] == "path_not_allowed"
    e = err("POST", A, {"name": "x", "path": str(adapters["c"] / "adapter_config.json")}, 400)
    assert e["param"] == "path" and "adapter_config.json" in e["message"]
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

    srv3 = Server(mneme_bin, model_path, "--persist-dir", str(d), *lora_a, "--lora-dir", str(adapters["a"].parent))
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


def test_adapter_admin_policy(mneme_bin, model_path, adapters, tmp_path):
    """Who may POST / DELETE /v1/adapters: with admin keys only they; with API keys but no admin
    keys nobody; with no keys at all anyone, but only with --lora-dir; a load always needs
    --lora-dir. GET stays open to every valid key."""
    A, lora_dir = "/v1/adapters", str(adapters["a"].parent)
    keys, admins = tmp_path / "keys", tmp_path / "admins"
    keys.write_text("key-user\n")
    admins.write_text("# operators\nkey-admin\n")
    U, ADM = {"Authorization": "Bearer key-user"}, {"Authorization": "Bearer key-admin"}
    load = {"name": "c", "path": str(adapters["c"])}

    def refused(srv, method, path, body, headers=None, code="admin_required", param=None):
        st, data, _ = srv.request(method, path, body, headers)
        assert st == 403, (method, path, st, data)
        e = json.loads(data)["error"]
        assert e["type"] == "permission_error" and e["code"] == code and e["param"] == param, e
        return e["message"]

    # no keys, no --lora-dir: nobody, not even to unload a start-up adapter
    srv = Server(mneme_bin, model_path, "--lora", f"a={adapters['a']}")
    try:
        assert "--lora-dir" in refused(srv, "POST", A, load)
        assert "--lora-dir" in refused(srv, "DELETE", f"{A}/a", None)
        assert [x["id"] for x in srv.json("GET", A)["data"]] == ["a"]
    finally:
        srv.close()

    # API keys without admin keys: nobody, whatever the key and even with --lora-dir
    srv = Server(mneme_bin, model_path, "--api-key-file", str(keys), "--lora-dir", lora_dir,
                 "--lora", f"a={adapters['a']}")
    try:
        assert "--admin-key-file" in refused(srv, "POST", A, load, U)
        refused(srv, "DELETE", f"{A}/a", None, U)
        assert srv.request("POST", A, load)[0] == 401
        assert [x["id"] for x in srv.json("GET", A, headers=U)["data"]] == ["a"]
    finally:
        srv.close()

    # admin keys: only they; an admin key is also an API key
    srv = Server(mneme_bin, model_path, "--api-key-file", str(keys), "--admin-key-file", str(admins),
                 "--lora-dir", lora_dir, "--lora", f"a={adapters['a']}")
    try:
        assert "admin key" in refused(srv, "POST", A, load, U)
        refused(srv, "DELETE", f"{A}/a", None, U)
        assert srv.request("POST", A, load)[0] == 401
        assert srv.request("POST", A, load, {"Authorization": "Bearer key-nobody"})[0] == 401
        assert srv.json("POST", A, load, ADM)["id"] == "c"
        assert {x["id"] for x in srv.json("GET", A, headers=U)["data"]} == {"a", "c"}
        r = srv.json("POST", "/v1/completions", {"model": "c", "prompt": "x", "max_tokens": 1}, U)
        assert r["usage"]["completion_tokens"] == 1
        assert srv.json("POST", S, {}, ADM)["object"] == "session"
        assert srv.json("DELETE", f"{A}/c", headers=ADM)["deleted"] is True
    finally:
        srv.close()

    # admin keys without --lora-dir: unloading yes, loading no (no directory to confine it to)
    srv = Server(mneme_bin, model_path, "--admin-key-file", str(admins), "--lora", f"a={adapters['a']}")
    try:
        assert "--lora-dir" in refused(srv, "POST", A, load, ADM, code="path_not_allowed", param="path")
        assert srv.json("DELETE", f"{A}/a", headers=ADM)["deleted"] is True
        assert srv.request("GET", A)[0] == 401   # admin keys alone turn authentication on
    finally:
        srv.close()

    for flags, msg in ((["--admin-key-file", str(tmp_path / "none")], "--admin-key-file"),
                       (["--lora-dir", str(tmp_path / "none")], "--lora-dir"),
                       (["--lora-dir", str(keys)], "--lora-dir")):
        r = subprocess.run([str(mneme_bin), "serve", "-m", str(model_path), "--port", "0", *flags],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, (flags, r.stderr)


def test_lora_dir_confines_paths(server, gen_lora, model_path, adapters, tmp_path):
    """A path must resolve (realpath) to inside --lora-dir: absolute paths outside, `..`
    escapes, symlinks pointing out (the directory or one of its files) are 403 naming `path`,
    the same as a missing path; relative paths are taken against the directory; links that
    stay inside are followed."""
    A, d = "/v1/adapters", adapters["a"].parent
    outside = tmp_path / "outside"
    gen_lora.generate(str(outside), gen_lora.model_shape(str(model_path)), r=4, targets=("q_proj",), seed=9)
    links = {"link-out": outside, "link-in": adapters["c"]}
    mixed = d / "mixed"   # a real directory inside whose weights file points out
    mixed.mkdir()
    (mixed / "adapter_config.json").write_bytes((outside / "adapter_config.json").read_bytes())
    (mixed / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    for name, target in links.items():
        (d / name).symlink_to(target)
    try:
        for path in (str(outside), f"../{outside.parent.name}/outside", str(d / ".." / outside.parent.name / "outside"),
                     "link-out", str(d / "link-out"), "mixed", "/etc", "does-not-exist"):
            st, data, _ = server.request("POST", A, {"name": "x", "path": path})
            assert st == 403, (path, st, data)
            e = json.loads(data)["error"]
            assert e["param"] == "path" and e["code"] == "path_not_allowed" and str(d) in e["message"], (path, e)
        assert "adapter_model.safetensors" in json.loads(server.request("POST", A, {"name": "x", "path": "mixed"})[1])[
            "error"]["message"]
        assert "x" not in {x["id"] for x in server.json("GET", A)["data"]}
        got = server.json("POST", A, {"name": "x", "path": "link-in"})   # a link that stays inside
        assert got["path"] == str(adapters["c"].resolve())
        server.json("DELETE", f"{A}/x")
        assert server.json("POST", A, {"name": "x", "path": "c"})["path"] == str(adapters["c"].resolve())
        server.json("DELETE", f"{A}/x")
    finally:
        for name in links:
            (d / name).unlink()
        for f in mixed.iterdir():
            f.unlink()
        mixed.rmdir()


def test_adapter_files_are_read_off_the_engine_thread(server, adapters):
    """The load's adapter_config.json is a FIFO nobody writes yet, so reading it blocks: a
    stream running meanwhile must keep getting tokens and other engine requests must answer
    (the engine thread is free). Then the config is written and the load completes."""
    A, d = "/v1/adapters", adapters["a"].parent
    slow = d / "slow"
    slow.mkdir()
    (slow / "adapter_model.safetensors").symlink_to(adapters["c"] / "adapter_model.safetensors")
    fifo = slow / "adapter_config.json"
    os.mkfifo(fifo)
    result = {}

    def post():
        result["r"] = server.request("POST", A, {"name": "slow", "path": "slow"}, timeout=120)

    loader = threading.Thread(target=post)
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)   # a stalled stream fails fast
    try:
        c.request("POST", "/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": 3000,
                                                         "temperature": 0, "stream": True}),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        loader.start()
        # wait until the loader has the FIFO open for reading (a writer can open it then)
        wfd = open_fifo_writer(fifo)
        # the loader is blocked reading: tokens must keep flowing and the engine must answer
        n, t_end = 0, time.time() + 1.0
        while time.time() < t_end:
            if r.fp.readline().startswith(b"data: {"):
                n += 1
        assert n >= 5, f"only {n} tokens in 1 s while an adapter load was blocked"
        t0 = time.time()
        st, _, _ = server.request("GET", "/v1/sessions", timeout=10)
        assert st == 200 and time.time() - t0 < 5
        assert loader.is_alive()
        os.write(wfd, (adapters["c"] / "adapter_config.json").read_bytes())
        os.close(wfd)
        loader.join(60)
        st, data, _ = result["r"]
        assert st == 200 and json.loads(data)["id"] == "slow", data
    finally:
        c.close()
        if loader.is_alive():   # unblock a load that is still waiting, whatever failed
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.write(fd, b"{}")
                os.close(fd)
            except OSError:
                pass
            loader.join(60)
        server.request("DELETE", f"{A}/slow")
        fifo.unlink()
        (slow / "adapter_model.safetensors").unlink()
        slow.rmdir()


def test_shutdown_during_an_adapter_load(mneme_bin, model_path, adapters, tmp_path):
    """SIGTERM while a load is still reading (a FIFO config nobody has written): the engine
    thread stops meanwhile; when the read completes the parsed adapter is dropped, not
    installed into a stopped engine, and the server exits 0 (leak-free under ASan)."""
    d = tmp_path / "loras"
    slow = d / "slow"
    slow.mkdir(parents=True)
    (slow / "adapter_model.safetensors").write_bytes((adapters["c"] / "adapter_model.safetensors").read_bytes())
    fifo = slow / "adapter_config.json"
    os.mkfifo(fifo)
    srv = Server(mneme_bin, model_path, "--lora-dir", str(d), "--drain-timeout", "0")
    result = {}

    def post():
        try:
            result["r"] = srv.request("POST", "/v1/adapters", {"name": "slow", "path": "slow"}, timeout=60)
        except OSError as e:   # the server closed the connection while shutting down
            result["r"] = e

    loader = threading.Thread(target=post)
    loader.start()
    try:
        wfd = open_fifo_writer(fifo)
        srv.proc.send_signal(signal.SIGTERM)
        end = time.time() + 20
        while "shutting down" not in srv.stderr() and time.time() < end:
            time.sleep(0.02)
        time.sleep(0.3)
        assert srv.proc.poll() is None   # still waiting for the read
        os.write(wfd, (adapters["c"] / "adapter_config.json").read_bytes())
        os.close(wfd)
        wfd = None
        assert srv.proc.wait(timeout=30) == 0, srv.stderr()
        loader.join(30)
        r = result.get("r")
        assert isinstance(r, OSError) or r[0] == 503, r
    finally:
        if wfd is not None:
            os.close(wfd)
        srv.close()



def test_memory_budget_split_pages_adapters(mneme_bin, model_path, adapters, server, client):
    """--mem-budget B --adapter-share F: the KV pool gets the blocks that fit in B - F*B and the
    adapters' device copies F*B, paged LRU within it. With room for one of a and b, requests
    alternating between them page each in every time and still answer exactly as a server
    without a budget does."""
    sizes = {a["id"]: a["bytes"] for a in server.json("GET", "/v1/adapters")["data"]}
    want = {name: chat(client, name, n=8) for name in ("a", "b")}
    block = int(metric(server, "mneme_kv_block_tokens") * metric(server, "mneme_kv_bytes_per_token"))
    share_bytes = max(sizes["a"], sizes["b"]) + 64          # one fits, both do not
    assert share_bytes < sizes["a"] + sizes["b"]
    budget = 96 * block + share_bytes
    share = share_bytes / budget
    s = Server(mneme_bin, model_path, "--lora", f"a={adapters['a']}", "--lora", f"b={adapters['b']}",
               "--mem-budget", str(budget), "--adapter-share", repr(share))
    try:
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0, timeout=60)
        for name in ("a", "b", "a", "b"):
            assert chat(c, name, n=8) == want[name]
        adapter_budget = metric(s, 'mneme_adapter_device_bytes{state="budget"}')
        assert adapter_budget == int(budget * share)
        assert metric(s, 'mneme_adapter_device_bytes{state="resident"}') <= adapter_budget
        assert metric(s, "mneme_adapter_page_ins_total") >= 4
        assert metric(s, 'mneme_kv_blocks{state="total"}') == (budget - int(budget * share)) // block
        assert "KV pool" in s.stderr()
    finally:
        s.close()


@pytest.mark.parametrize("flags,status,words", [
    (["--mem-budget", "100000000", "--kv-blocks", "64"], 2, "give one"),
    (["--adapter-share", "0.2"], 2, "--adapter-share is a share of --mem-budget"),
    (["--mem-budget", "100000000", "--adapter-share", "0.95"], 2, "--adapter-share"),
    (["--mem-budget", "1000"], 1, "less than one block"),
    (["--mem-budget", "100000000", "--adapter-share", "0.00001"], 1, "adapter share"),
])
def test_memory_budget_bad_flags(mneme_bin, model_path, adapters, flags, status, words):
    r = subprocess.run([str(mneme_bin), "serve", "-m", str(model_path), "--port", "0", "-t", "1",
                        "--lora", f"a={adapters['a']}", *flags], capture_output=True, text=True, timeout=60)
    assert r.returncode == status, r.stderr
    assert words in r.stderr, r.stderr
