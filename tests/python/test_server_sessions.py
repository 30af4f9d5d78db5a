"""tests/python/test_server_sessions.py — the session API of `mneme serve` end to end: create,
append, generate (the reply stays in the session), fork, rewind, export/import, delete;
a client that disconnects mid-stream; API keys that cannot see each other's sessions;
sessions that survive a restart."""
from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from server_util import Server, metric, sse_events

S = "/v1/sessions"


@pytest.fixture(scope="module")
def server(mneme_bin, model_path):
    s = Server(mneme_bin, model_path)
    yield s
    s.close()


def generate(server, sid, headers=None, **kw):
    body = dict({"max_tokens": 8, "temperature": 0}, **kw)
    status, data, _ = server.request("POST", f"{S}/{sid}/generate", body, headers)
    assert status == 200, data
    ev = sse_events(data)
    assert ev[-1] == "[DONE]"
    return ev[:-2], ev[-2]


def header_len(server):
    """Tokens of the assistant header a generate opens (<|im_start|>assistant\n: 4 in SmolLM2)."""
    sid = server.json("POST", S, {})["id"]
    n = server.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "x"})["n_tokens"]
    st, data, _ = server.request("POST", f"{S}/{sid}/generate", {"max_tokens": 1, "stream": False})
    server.json("DELETE", f"{S}/{sid}")
    return json.loads(data)["usage"]["prompt_tokens"] - n


def wait_idle(server, sid, headers=None, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        info = server.json("GET", f"{S}/{sid}", headers=headers)
        if not info["busy"]:
            return info
        time.sleep(0.05)
    raise AssertionError(f"session {sid} still busy")


def test_lifecycle(server):
    s = server.json("POST", S, {"system": "You are a terse assistant."})
    sid = s["id"]
    assert len(sid) == 32 and int(sid, 16) >= 0 and s["n_tokens"] > 0
    assert sid in [x["id"] for x in server.json("GET", S)["data"]]

    m = server.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "What is the capital of France?"})
    assert m["appended"] > 0 and m["n_tokens"] == s["n_tokens"] + m["appended"]
    toks, fin = generate(server, sid, max_tokens=12)
    text = "".join(t["text"] for t in toks)
    assert fin["finish_reason"] in ("stop", "length") and fin["usage"]["completion_tokens"] == len(toks)
    assert fin["usage"]["prompt_tokens"] > m["n_tokens"]   # the assistant header was opened
    info = wait_idle(server, sid)
    # the reply stays in the session
    assert info["n_tokens"] == fin["usage"]["prompt_tokens"] + len(toks)
    assert info["tokens"][-len(toks):] == [t["token"] for t in toks]
    assert text in info["text"]

    # next turn appends only the new message
    m2 = server.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "And of Germany?"})
    assert m2["n_tokens"] == info["n_tokens"] + m2["appended"]
    toks2, _ = generate(server, sid, max_tokens=6)
    assert len(toks2) >= 1

    # fork shares the history; rewinding the fork leaves the original alone
    before = wait_idle(server, sid)
    f = server.json("POST", f"{S}/{sid}/fork", {})
    assert f["id"] != sid and f["n_tokens"] == before["n_tokens"]
    r = server.json("POST", f"{S}/{f['id']}/rewind", {"n_tokens": m2["n_tokens"]})
    assert r["n_tokens"] == m2["n_tokens"]
    assert server.json("GET", f"{S}/{sid}")["n_tokens"] == before["n_tokens"]
    # rewound to just before the second reply: greedy gives the same reply again
    again, _ = generate(server, f["id"], max_tokens=6)
    assert [t["token"] for t in again] == [t["token"] for t in toks2]
    st, data, _ = server.request("POST", f"{S}/{f['id']}/rewind", {"n_tokens": 10 ** 6})
    assert st == 400 and json.loads(data)["error"]["param"] == "n_tokens"

    # export / import round trip
    st, blob, h = server.request("GET", f"{S}/{sid}/export")
    assert st == 200 and h["content-type"] == "application/octet-stream" and len(blob) > 1000
    imp = server.json("POST", f"{S}/import", blob, {"Content-Type": "application/octet-stream"})
    assert imp["id"] != sid and imp["n_tokens"] == before["n_tokens"]
    assert server.json("GET", f"{S}/{imp['id']}")["tokens"] == before["tokens"]

    # token messages and non-streamed generate
    server.json("POST", f"{S}/{imp['id']}/messages", {"role": "none", "tokens": [28, 29]})
    st, data, _ = server.request("POST", f"{S}/{imp['id']}/generate", {"max_tokens": 3, "temperature": 0, "stream": False})
    assert st == 200 and json.loads(data)["usage"]["completion_tokens"] == 3

    for x in (sid, f["id"], imp["id"]):
        assert server.json("DELETE", f"{S}/{x}")["deleted"] is True
        st, _, _ = server.request("GET", f"{S}/{x}")
        assert st == 404


def test_generate_while_generating_is_conflict(server):
    sid = server.json("POST", S, {})["id"]
    server.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "Tell me a long story."})
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    body = json.dumps({"max_tokens": 60, "temperature": 0})
    s.sendall(f"POST {S}/{sid}/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    s.recv(100)   # the stream has begun
    st, data, _ = server.request("POST", f"{S}/{sid}/generate", {"max_tokens": 2})
    assert st == 409, data
    s.close()
    wait_idle(server, sid)
    server.json("DELETE", f"{S}/{sid}")


def test_disconnect_mid_stream(server):
    sid = server.json("POST", S, {})["id"]
    m = server.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "Write a long poem about the sea."})
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    body = json.dumps({"max_tokens": 300, "temperature": 0})
    s.sendall(f"POST {S}/{sid}/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    buf = b""
    while buf.count(b'"token"') < 4:
        d = s.recv(4096)
        assert d, "stream ended early"
        buf += d
    got = buf.count(b'"token"')
    s.close()   # mid-stream
    t0 = time.time()
    info = wait_idle(server, sid)
    assert time.time() - t0 < 5
    start = m["n_tokens"] + header_len(server)
    kept = info["n_tokens"] - start
    # generation stopped early, and the tokens delivered before the disconnect stay
    assert got <= kept < 300, (got, kept)
    # the server keeps serving, the session can go on
    toks, fin = generate(server, sid, max_tokens=2)
    assert fin["usage"]["completion_tokens"] == 2
    server.json("DELETE", f"{S}/{sid}")
    status, data, _ = server.request("GET", "/metrics")
    assert b"mneme_streams_cancelled_total 1" in data or b"mneme_streams_cancelled_total 2" in data


def test_api_keys_isolate_sessions(mneme_bin, model_path, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# two tenants\nkey-alice\n\nkey-bob\n")
    srv = Server(mneme_bin, model_path, "--api-key-file", str(keys))
    try:
        A = {"Authorization": "Bearer key-alice"}
        B = {"Authorization": "Bearer key-bob"}
        for h, why in ((None, "missing"), ({"Authorization": "Bearer nope"}, "invalid"), ({"Authorization": "key-alice"}, "")):
            st, data, _ = srv.request("GET", S, headers=h)
            assert st == 401, data
            err = json.loads(data)["error"]
            assert err["type"] == "authentication_error" and why in err["message"]
        st, _, _ = srv.request("GET", "/health")
        assert st == 200
        a = srv.json("POST", S, {"system": "hi"}, A)["id"]
        b = srv.json("POST", S, {}, B)["id"]
        assert [x["id"] for x in srv.json("GET", S, headers=A)["data"]] == [a]
        assert [x["id"] for x in srv.json("GET", S, headers=B)["data"]] == [b]
        # bob sees alice's session as missing, whatever he tries
        for method, path, body in (("GET", f"{S}/{a}", None), ("DELETE", f"{S}/{a}", None),
                                   ("POST", f"{S}/{a}/messages", {"role": "user", "content": "x"}),
                                   ("POST", f"{S}/{a}/generate", {"max_tokens": 1}),
                                   ("POST", f"{S}/{a}/fork", {}), ("GET", f"{S}/{a}/export", None),
                                   ("POST", f"{S}/{a}/rewind", {"n_tokens": 0})):
            st, data, _ = srv.request(method, path, body, B)
            assert st == 404, (method, path, data)
            assert "not found" in json.loads(data)["error"]["message"]
        assert srv.json("GET", f"{S}/{a}", headers=A)["id"] == a
        # the OpenAI routes need a key too
        st, _, _ = srv.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert st == 401
        r = srv.json("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, A)
        assert r["usage"]["completion_tokens"] == 1
    finally:
        srv.close()


def test_session_limit_per_key(mneme_bin, model_path, tmp_path):
    """--max-sessions-per-key 2: a third create, a fork and an import are 429 naming the limit,
    for that key only; a delete makes room again."""
    keys = tmp_path / "keys"
    keys.write_text("key-alice\nkey-bob\n")
    srv = Server(mneme_bin, model_path, "--api-key-file", str(keys), "--max-sessions-per-key", "2")
    try:
        A = {"Authorization": "Bearer key-alice"}
        B = {"Authorization": "Bearer key-bob"}
        a1 = srv.json("POST", S, {"system": "hi"}, A)["id"]
        a2 = srv.json("POST", f"{S}/{a1}/fork", {}, A)["id"]
        st, blob, _ = srv.request("GET", f"{S}/{a1}/export", headers=A)
        assert st == 200
        for method, path, body in (("POST", S, {}), ("POST", f"{S}/{a1}/fork", {}),
                                   ("POST", f"{S}/import", blob)):
            st, data, headers = srv.request(method, path, body, A)
            assert st == 429, (path, st, data[:300])
            err = json.loads(data)["error"]
            assert err["code"] == "session_limit_reached", err
            assert "already holds 2 sessions" in err["message"] and "--max-sessions-per-key 2" in err["message"], err
        assert sorted(x["id"] for x in srv.json("GET", S, headers=A)["data"]) == sorted([a1, a2])
        b = [srv.json("POST", S, {}, B)["id"] for _ in range(2)]   # another key has its own count
        assert srv.request("POST", S, {}, B)[0] == 429
        srv.json("DELETE", f"{S}/{a2}", headers=A)
        a3 = srv.json("POST", f"{S}/import", blob, A)["id"]
        assert srv.json("GET", f"{S}/{a3}", headers=A)["tokens"] == srv.json("GET", f"{S}/{a1}", headers=A)["tokens"]
        for sid in b:
            srv.json("DELETE", f"{S}/{sid}", headers=B)
    finally:
        srv.close()
    r = subprocess.run([str(mneme_bin), "serve", "-m", str(model_path), "--max-sessions-per-key", "-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--max-sessions-per-key" in r.stderr, r.stderr


def test_sessions_survive_restart(mneme_bin, model_path, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1\nk2\n")
    d = tmp_path / "persist"
    d.mkdir()
    K1 = {"Authorization": "Bearer k1"}
    K2 = {"Authorization": "Bearer k2"}
    srv = Server(mneme_bin, model_path, "--persist-dir", str(d), "--api-key-file", str(keys))
    try:
        sid = srv.json("POST", S, {"system": "You are helpful."}, K1)["id"]
        srv.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "Name a fruit."}, K1)
        gone = srv.json("POST", S, {}, K1)["id"]
        srv.json("DELETE", f"{S}/{gone}", headers=K1)
        before = wait_idle(srv, sid, K1)
        # what the next turn gives without a restart (on a fork, so sid stays as it is)
        fork = srv.json("POST", f"{S}/{sid}/fork", {}, K1)["id"]
        ref, _ = generate(srv, fork, K1, max_tokens=6)
        srv.json("DELETE", f"{S}/{fork}", headers=K1)
    finally:
        rc = srv.stop()
    assert rc == 0, srv.stderr()
    assert "1 sessions saved" in srv.stderr()
    saved = d / f"saved-{sid}.mns"
    st0 = saved.stat()
    srv2 = Server(mneme_bin, model_path, "--persist-dir", str(d), "--api-key-file", str(keys))
    try:
        assert "1 sessions loaded" in srv2.stderr()
        after = srv2.json("GET", f"{S}/{sid}", headers=K1)
        assert after["tokens"] == before["tokens"] and after["id"] == sid
        assert after["tier"] == "T3"  # listed from its file, KV not read until first use
        st, _, _ = srv2.request("GET", f"{S}/{sid}", headers=K2)
        assert st == 404
        st, _, _ = srv2.request("GET", f"{S}/{gone}", headers=K1)
        assert st == 404
    finally:
        rc = srv2.stop()
    assert rc == 0, srv2.stderr()
    # an untouched session is not rewritten at shutdown: its saved file is already its state
    st1 = saved.stat()
    assert (st1.st_mtime_ns, st1.st_size, st1.st_ino) == (st0.st_mtime_ns, st0.st_size, st0.st_ino)
    srv3 = Server(mneme_bin, model_path, "--persist-dir", str(d), "--api-key-file", str(keys))
    try:
        assert srv3.json("GET", f"{S}/{sid}", headers=K1)["tier"] == "T3"
        toks, _ = generate(srv3, sid, K1, max_tokens=6)  # restored from the file on first use
        assert [t["token"] for t in toks] == [t["token"] for t in ref]
        assert srv3.json("GET", f"{S}/{sid}", headers=K1)["tier"] == "T0"
        st2 = saved.stat()
        assert (st2.st_mtime_ns, st2.st_ino) == (st0.st_mtime_ns, st0.st_ino)  # read, never written
    finally:
        srv3.close()


def start_stream(srv, sid, headers, max_tokens):
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    body = json.dumps({"max_tokens": max_tokens, "temperature": 0})
    h = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    s.sendall(f"POST {S}/{sid}/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{h}"
              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    buf = b""
    while b'"token"' not in buf:
        d = s.recv(4096)
        assert d, "stream ended before its first token"
        buf += d
    return s, buf


def read_all(s, buf):
    while True:
        try:
            d = s.recv(65536)
        except OSError:
            break
        if not d:
            break
        buf += d
    s.close()
    return buf


def test_sigterm_lets_streams_finish(mneme_bin, model_path, tmp_path):
    srv = Server(mneme_bin, model_path, "--persist-dir", str(tmp_path))
    sid = srv.json("POST", S, {})["id"]
    srv.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "Tell me about the moon."})
    s, buf = start_stream(srv, sid, None, 24)
    rc = srv.stop()
    buf = read_all(s, buf)
    assert rc == 0, srv.stderr()
    assert buf.count(b'"token"') == 24 and b"data: [DONE]" in buf
    assert "1 sessions saved" in srv.stderr()


def test_drain_deadline_then_restart_keeps_delivered(mneme_bin, model_path, tmp_path):
    srv = Server(mneme_bin, model_path, "--persist-dir", str(tmp_path), "--drain-timeout", "0.3")
    sid = srv.json("POST", S, {})["id"]
    m = srv.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "Write a very long essay about rivers."})
    s, buf = start_stream(srv, sid, None, 2000)
    t0 = time.time()
    rc = srv.stop()
    buf = read_all(s, buf)
    assert rc == 0, srv.stderr()
    assert time.time() - t0 < 8
    assert b"data: [DONE]" not in buf   # cut at the deadline
    sent = buf.count(b'"token"')
    srv2 = Server(mneme_bin, model_path, "--persist-dir", str(tmp_path))
    try:
        info = srv2.json("GET", f"{S}/{sid}")
        kept = info["n_tokens"] - (m["n_tokens"] + header_len(srv2))
        assert sent <= kept < 2000, (sent, kept)
    finally:
        srv2.close()


def test_idle_sessions_move_down_tiers(mneme_bin, model_path, tmp_path):
    srv = Server(mneme_bin, model_path, "--persist-dir", str(tmp_path), "--idle-demote", "0.1")
    try:
        sid = srv.json("POST", S, {"system": "You are helpful."})["id"]
        srv.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "Hello!"})
        ref_sid = srv.json("POST", f"{S}/{sid}/fork", {})["id"]   # computed first: fork waits for nothing
        end = time.time() + 10
        while time.time() < end and srv.json("GET", f"{S}/{sid}")["tier"] != "T3":
            time.sleep(0.1)
        assert srv.json("GET", f"{S}/{sid}")["tier"] == "T3"
        _, data, _ = srv.request("GET", "/metrics")
        assert b'mneme_tier_sessions{tier="T3"}' in data
        toks, _ = generate(srv, sid, max_tokens=4)   # promoted back on use
        ref, _ = generate(srv, ref_sid, max_tokens=4)
        assert [t["token"] for t in toks] == [t["token"] for t in ref]
    finally:
        srv.close()


def test_every_chat_message_is_framed(server):
    sid = server.json("POST", S, {"system": "Be brief."})["id"]
    server.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": "Hi"})
    text = wait_idle(server, sid)["text"]
    server.json("DELETE", f"{S}/{sid}")
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" in text, text


def test_damaged_saved_session_is_refused_and_kept(mneme_bin, model_path, tmp_path):
    srv = Server(mneme_bin, model_path, "--persist-dir", str(tmp_path))
    sid = srv.json("POST", S, {"system": "hello"})["id"]
    wait_idle(srv, sid)
    assert srv.stop() == 0
    f = tmp_path / f"saved-{sid}.mns"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    srv2 = Server(mneme_bin, model_path, "--persist-dir", str(tmp_path))
    try:
        assert f"session {sid} not loaded" in srv2.stderr()
        st, _, _ = srv2.request("GET", f"{S}/{sid}")
        assert st == 404
    finally:
        srv2.close()
    # not swept: the file and its map entry wait for a fix (or a human)
    assert f.exists()
    assert sid in (tmp_path / "serve-sessions.json").read_text()



@pytest.mark.parametrize("reserve", ["8", "0"])
def test_kv_reserve_refills_in_background(mneme_bin, model_path, reserve):
    """A 24-block pool, 8 sessions taking turns: with --kv-reserve 8 the turns after the
    pool first runs short find blocks that background demotions freed; with 0 (off) every
    demotion is one the engine thread waited for."""
    srv = Server(mneme_bin, model_path, "--kv-blocks", "24", "--kv-reserve", reserve, "--idle-demote", "0")
    try:
        sids = [srv.json("POST", S, {"system": f"You are agent number {i}. Answer in one short sentence."})["id"]
                for i in range(8)]
        for rnd in range(2):
            for i, sid in enumerate(sids):
                srv.json("POST", f"{S}/{sid}/messages", {"role": "user", "content": f"Round {rnd}: hello {i}?"})
                generate(srv, sid, max_tokens=2)
        assert metric(srv, 'mneme_kv_reserve_blocks{state="target"}') == int(reserve)
        waited = metric(srv, 'mneme_kv_demotions_total{mode="waited"}')

        background = metric(srv, 'mneme_kv_demotions_total{mode="background"}')
        print(f"--kv-reserve {reserve}: waited {waited:.0f}, background {background:.0f}")
        if reserve == "0":
            assert background == 0 and waited > 8
        else:
            assert metric(srv, "mneme_kv_reserve_demotions_total") > 0
            assert waited * 4 < background, (waited, background)
    finally:
        srv.close()
