"""tests/python/test_server_ws.py — the full-duplex WebSocket of a session,
/v1/sessions/{id}/stream: append, generate, interrupt (the undelivered tail is rewound),
errors as frames, and a socket closed mid-generation."""
from __future__ import annotations

import time

import pytest

from server_util import WS, Server

S = "/v1/sessions"


@pytest.fixture(scope="module")
def server(mneme_bin, model_path):
    s = Server(mneme_bin, model_path)
    yield s
    s.close()


def until_done(ws):
    toks = []
    while True:
        m = ws.recv()
        assert m is not None, "socket closed before done"
        if m["type"] == "token":
            toks.append(m)
        elif m["type"] in ("done", "error"):
            return toks, m


def wait_idle(server, sid, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        info = server.json("GET", f"{S}/{sid}")
        if not info["busy"]:
            return info
        time.sleep(0.05)
    raise AssertionError("session still busy")


def test_ws_append_generate_interrupt(server):
    sid = server.json("POST", S, {"system": "You are helpful."})["id"]
    ws = WS(server.port, f"{S}/{sid}/stream")
    assert ws.status == 101
    ready = ws.recv()
    assert ready["type"] == "ready" and ready["id"] == sid

    ws.send({"type": "append", "role": "user", "content": "Name three colors."})
    a = ws.recv()
    assert a["type"] == "appended" and a["appended"] > 0
    ws.send({"type": "generate", "max_tokens": 8, "temperature": 0})
    toks, done = until_done(ws)
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == len(toks) >= 1
    info = wait_idle(server, sid)
    assert info["tokens"][-len(toks):] == [t["token"] for t in toks]

    # speech-recognition style: a few tokens at a time, then a long answer that is interrupted
    for piece in ("Tell me", " a very long", " story about dragons,", " with many details."):
        ws.send({"type": "append", "role": "none", "content": piece})
        assert ws.recv()["type"] == "appended"
    ws.send({"type": "append", "role": "user", "content": "Go on, please."})
    assert ws.recv()["type"] == "appended"
    ws.send({"type": "generate", "max_tokens": 400, "temperature": 0})
    got = []
    while len(got) < 3:
        m = ws.recv()
        assert m["type"] == "token", m
        got.append(m)
    ws.send({"type": "generate", "max_tokens": 2})   # one generation at a time
    ws.send({"type": "interrupt"})
    rest, done = until_done(ws)
    errors = [m for m in rest if m["type"] == "error"]
    if done["type"] == "error":   # the 409 came after the tokens; the done frame follows
        errors.append(done)
        more, done = until_done(ws)
        rest += more
    assert errors and "already generating" in errors[0]["error"]["message"]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    delivered = got + [m for m in rest if m["type"] == "token"]
    before = done["usage"]["prompt_tokens"]   # the session's length when generation began (after the assistant header)
    assert done["usage"]["completion_tokens"] == len(delivered) < 400
    info = wait_idle(server, sid)
    # exactly what was delivered stays; the undelivered tail is rewound
    assert info["n_tokens"] == before + len(delivered)
    assert info["tokens"][before:] == [t["token"] for t in delivered]

    # errors come back as frames and the socket stays usable
    ws.send({"type": "interrupt"})
    assert "nothing to interrupt" in ws.recv()["error"]["message"]
    ws.send({"type": "dance"})
    e = ws.recv()
    assert e["type"] == "error" and e["error"]["param"] == "type"
    ws._frame(1, b"{not json")
    assert "malformed JSON" in ws.recv()["error"]["message"]
    ws.send({"type": "append", "role": "user"})
    assert ws.recv()["error"]["param"] == "content"
    ws.send({"type": "generate", "max_tokens": 2, "temperature": 0})
    toks, done = until_done(ws)
    assert done["type"] == "done" and len(toks) == 2
    ws.close()
    server.json("DELETE", f"{S}/{sid}")


def test_ws_close_mid_generation(server):
    sid = server.json("POST", S, {})["id"]
    ws = WS(server.port, f"{S}/{sid}/stream")
    assert ws.recv()["type"] == "ready"
    ws.send({"type": "append", "role": "user", "content": "Write a long poem."})
    ws.recv()
    ws.send({"type": "generate", "max_tokens": 400, "temperature": 0})
    assert ws.recv()["type"] == "token"
    ws.s.close()   # no close frame: the connection is just gone
    info = wait_idle(server, sid)
    assert info["n_tokens"] < 400 + 20
    assert server.json("GET", "/health")["streams"] == 0
    server.json("DELETE", f"{S}/{sid}")


def test_ws_refusals(server):
    st, data, _ = server.request("GET", f"{S}/0123456789abcdef0123456789abcdef/stream")
    assert st == 400 and b"WebSocket" in data
    ws = WS(server.port, f"{S}/0123456789abcdef0123456789abcdef/stream")
    assert ws.status == 404
    ws.s.close()
    st, _, _ = server.request("POST", f"{S}/0123456789abcdef0123456789abcdef/stream", {})
    assert st == 405
