"""tests/python/test_http_transport.py — the HTTP/1.1 transport (server/http.c) over raw
sockets, against tests/tools/http_echo (built into $MNEME_BUILD_DIR, default build/).

Each test starts its own http_echo on a free loopback port with the limits it needs,
speaks HTTP by hand (so malformed and pipelined input is possible), and at the end sends
SIGTERM and requires a clean exit (every handle closed, exit status 0).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


@pytest.fixture
def echo(build_dir: Path):
    """echo(**flags) -> (port, Popen); flags map to http_echo options (idle_ms -> --idle-ms)."""
    exe = build_dir / "http_echo"
    if not exe.is_file():
        pytest.fail(f"http_echo not found at {exe}: build it (ninja -C {build_dir} http_echo)", pytrace=False)
    procs = []

    def start(**flags):
        args = [str(exe)]
        for k, v in flags.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        # under ASan, freed memory sits in a quarantine and would count as RSS growth
        env = dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=4")
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(p)
        line = p.stdout.readline()
        assert line.startswith("port "), f"http_echo did not start: {line!r} {p.stderr.read()}"
        return int(line.split()[1]), p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                rc = p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                pytest.fail("http_echo did not exit within 10 s of SIGTERM")
            err = p.stderr.read()
            assert rc == 0, f"http_echo exit status {rc}; stderr:\n{err}"


class Conn:
    """A raw client connection with a byte buffer and a small HTTP/1.1 response reader."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes | str):
        self.s.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self) -> bool:
        d = self.s.recv(65536)
        if not d:
            return False
        self.buf += d
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed; buffered {self.buf!r}")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed after {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head: bool = False):
        """-> (status, headers dict with lower-case names, body bytes)."""
        status_line = self._line().decode()
        parts = status_line.split(" ", 2)
        assert parts[0] in ("HTTP/1.1", "HTTP/1.0"), status_line
        status = int(parts[1])
        headers = {}
        while True:
            line = self._line().decode()
            if not line:
                break
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        if head or status in (100, 204, 304):
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self._take(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    assert self._line() == b""
                    return status, headers, body
                body += self._take(size)
                assert self._take(2) == b"\r\n"
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body

    def closed(self, timeout: float = 3.0, drain: bool = False) -> bool:
        """True when the server closes (EOF or reset) within timeout with nothing more sent
        (drain: whatever else arrives first is kept in buf)."""
        self.s.settimeout(timeout)
        end = time.monotonic() + timeout
        while True:
            try:
                d = self.s.recv(65536)
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
            self.buf += d
            if d == b"" or not drain or time.monotonic() > end:
                return d == b""

    def close(self):
        self.s.close()


def get(path: str, extra: str = "") -> str:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n"


def error_of(body: bytes) -> str:
    e = json.loads(body)["error"]
    assert e["type"] == "invalid_request_error" and e["param"] is None and e["code"] is None, e
    return e["message"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------------------------------


def test_keep_alive_several_requests(echo):
    port, _ = echo()
    c = Conn(port)
    for i in range(5):
        c.send(get(f"/r{i}?i={i}", "X-Test: v%d\r\n" % i))
        st, h, body = c.response()
        assert st == 200 and h["connection"] == "keep-alive"
        j = json.loads(body)
        assert j["method"] == "GET" and j["path"] == f"/r{i}" and j["query"] == f"i={i}"
        assert ["x-test", f"v{i}"] in j["headers"] and ["host", "t"] in j["headers"]
    c.close()


def test_pipelined_responses_in_request_order(echo):
    port, _ = echo()
    c = Conn(port)
    t0 = time.monotonic()
    c.send(get("/slow?ms=300") + get("/second") + get("/third"))
    st, _, b1 = c.response()
    assert st == 200 and json.loads(b1) == {"slow": 300}
    assert time.monotonic() - t0 >= 0.28
    assert json.loads(c.response()[2])["path"] == "/second"
    assert json.loads(c.response()[2])["path"] == "/third"
    # the connection is still usable afterwards
    c.send(get("/fourth"))
    assert json.loads(c.response()[2])["path"] == "/fourth"


def test_many_pipelined_requests_beyond_inflight_limit(echo):
    port, _ = echo()
    c = Conn(port)
    c.send("".join(get(f"/p{i}") for i in range(50)))
    for i in range(50):
        assert json.loads(c.response()[2])["path"] == f"/p{i}"


def test_content_length_body(echo):
    port, _ = echo()
    c = Conn(port)
    body = "x" * 5000 + "end"
    c.send(f"POST /cl HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n")
    time.sleep(0.05)  # the body arrives in a later read
    c.send(body)
    j = json.loads(c.response()[2])
    assert j["method"] == "POST" and j["body"] == body and j["body_len"] == len(body)


def test_chunked_body(echo):
    port, _ = echo()
    c = Conn(port)
    c.send("POST /ch HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           "5\r\nhello\r\n")
    time.sleep(0.05)
    c.send("1;ext=1\r\n \r\nb\r\nchunked wor\r\n2\r\nld\r\n0\r\n\r\n")
    j = json.loads(c.response()[2])
    assert j["body"] == "hello chunked world" and j["body_len"] == 19
    c.send(get("/after"))  # keep-alive after a chunked body
    assert json.loads(c.response()[2])["path"] == "/after"


def test_header_too_large_431(echo):
    port, _ = echo(max_header=1024)
    c = Conn(port)
    c.send(get("/", "X-Big: " + "a" * 2000 + "\r\n"))
    st, h, body = c.response()
    assert st == 431 and h["connection"] == "close"
    assert "1024 bytes" in error_of(body)
    assert c.closed()


def test_body_too_large_413_content_length(echo):
    port, _ = echo(max_body=1000)
    c = Conn(port)
    c.send("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n")
    st, _, body = c.response()  # answered before the body is sent
    assert st == 413
    msg = error_of(body)
    assert "5000" in msg and "1000" in msg
    assert c.closed()


def test_body_too_large_413_chunked(echo):
    port, _ = echo(max_body=1000)
    c = Conn(port)
    c.send("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + "200\r\n" + "z" * 512 + "\r\n"
           + "200\r\n" + "z" * 512 + "\r\n")
    st, _, body = c.response()
    assert st == 413 and "1000 bytes" in error_of(body)


@pytest.mark.parametrize("raw, words", [
    ("GET /x HTTP/1.1 junk\r\nHost: t\r\n\r\n", ["HPE_INVALID_VERSION", "byte 15 of the request"]),
    ("GET / HTTP/1.1\r\nX@Y: t\r\n\r\n", ["invalid header token", "byte 17 of the request"]),
    ("GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n", ["invalid header value char", "byte 23 of the request"]),
    ("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     ["HPE_INVALID_CHUNK_SIZE", "byte 56 of the request"]),
    ("GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", ["content-length"]),
])
def test_malformed_request_400_names_problem(echo, raw, words):
    port, _ = echo()
    c = Conn(port)
    c.send(raw)
    st, h, body = c.response()
    assert st == 400 and h["connection"] == "close"
    msg = error_of(body)
    assert msg.startswith("malformed HTTP request")
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert c.closed()


def test_malformed_second_request_offset_relative_to_it(echo):
    port, _ = echo()
    c = Conn(port)
    c.send(get("/ok") + "GET / HTTP/1.1\r\nX@Y: t\r\n\r\n")
    assert c.response()[0] == 200  # the good one is answered first
    st, _, body = c.response()
    assert st == 400 and "byte 17 of the request" in error_of(body)


def test_idle_timeout_closes(echo):
    port, _ = echo(idle_ms=300)
    c = Conn(port)
    c.send(get("/a"))
    assert c.response()[0] == 200
    t0 = time.monotonic()
    assert c.closed(timeout=3)
    assert 0.2 <= time.monotonic() - t0 < 2.0


def test_slow_client_cut_off_408(echo):
    port, _ = echo(request_ms=400, idle_ms=5000)
    c = Conn(port)
    t0 = time.monotonic()
    c.send("GET /slowloris HTTP/1.1\r\nHost: t\r\n")
    for _ in range(2):  # keeps trickling headers, but never finishes in time
        time.sleep(0.1)
        c.send("X-A: b\r\n")
    st, _, body = c.response()
    assert st == 408 and "400 ms" in error_of(body)
    assert 0.35 <= time.monotonic() - t0 < 2.0
    assert c.closed()


def test_http10_close_and_keep_alive(echo):
    port, _ = echo()
    c = Conn(port)
    c.send("GET /old HTTP/1.0\r\n\r\n")
    st, h, body = c.response()
    assert st == 200 and h["connection"] == "close" and json.loads(body)["path"] == "/old"
    assert c.closed()
    c = Conn(port)
    c.send("GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    st, h, _ = c.response()
    assert st == 200 and h["connection"] == "keep-alive"
    c.send("GET /ka2 HTTP/1.0\r\n\r\n")
    assert json.loads(c.response()[2])["path"] == "/ka2"
    assert c.closed()
    # a streamed answer to HTTP/1.0 has no chunked framing: it ends with the connection
    c = Conn(port)
    c.send("GET /stream?n=3&ms=1 HTTP/1.0\r\n\r\n")
    st, h, body = c.response()
    assert st == 200 and "transfer-encoding" not in h and body == b"chunk\n" * 3


def test_connection_close_header(echo):
    port, _ = echo()
    c = Conn(port)
    c.send(get("/bye", "Connection: close\r\n") + get("/never"))
    st, h, body = c.response()
    assert st == 200 and h["connection"] == "close" and json.loads(body)["path"] == "/bye"
    assert c.closed()
    assert c.buf == b""  # the request after it was not answered


def test_expect_100_continue(echo):
    port, _ = echo()
    c = Conn(port)
    c.send("POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    st, _, _ = c.response()
    assert st == 100
    c.send("data")
    st, _, body = c.response()
    assert st == 200 and json.loads(body)["body"] == "data"


def test_expect_100_continue_refused_when_too_large(echo):
    port, _ = echo(max_body=10)
    c = Conn(port)
    c.send("POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 400\r\nExpect: 100-continue\r\n\r\n")
    st, _, body = c.response()
    assert st == 413 and "400" in error_of(body)


def test_streaming_chunks(echo):
    port, _ = echo()
    c = Conn(port)
    t0 = time.monotonic()
    c.send(get("/stream?n=5&ms=20"))
    st, h, body = c.response()
    assert st == 200 and h["transfer-encoding"] == "chunked" and body == b"chunk\n" * 5
    assert time.monotonic() - t0 >= 0.08
    c.send(get("/next"))
    assert json.loads(c.response()[2])["path"] == "/next"


def test_head_has_no_body(echo):
    port, _ = echo()
    c = Conn(port)
    c.send("HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" + get("/g"))
    st, h, _ = c.response(head=True)
    assert st == 200 and int(h["content-length"]) > 0
    assert json.loads(c.response()[2])["path"] == "/g"


def test_max_connections_503(echo):
    port, _ = echo(max_conns=2)
    a, b = Conn(port), Conn(port)
    a.send(get("/a"))
    b.send(get("/b"))
    assert a.response()[0] == 200 and b.response()[0] == 200
    c = Conn(port)
    c.send(get("/c"))
    st, h, body = c.response()
    assert st == 503 and h["retry-after"] == "1" and "limit 2" in error_of(body)
    assert c.closed()
    a.close()
    time.sleep(0.1)
    d = Conn(port)  # a slot is free again
    d.send(get("/d"))
    assert d.response()[0] == 200


def test_thousand_concurrent_keep_alive_connections(echo):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    port, _ = echo()
    conns = [Conn(port, timeout=10) for _ in range(1000)]
    for i, c in enumerate(conns):
        c.send(get(f"/c{i}"))
    for i, c in enumerate(conns):
        st, h, body = c.response()
        assert st == 200 and json.loads(body)["path"] == f"/c{i}"
    # all still open and usable: a second round on the same sockets
    for i, c in enumerate(conns):
        c.send(get(f"/d{i}"))
    for i, c in enumerate(conns):
        assert json.loads(c.response()[2])["path"] == f"/d{i}"
    for c in conns:
        c.close()


def test_non_reading_client_stream_rss_bounded(echo):
    port, p = echo(max_pending=256 * 1024)
    c = Conn(port)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    # 100000 chunks of 64 KiB would be 6.4 GB if the server buffered them all
    c.send(get("/stream?n=100000&ms=1&size=65536"))
    time.sleep(0.3)
    base = rss_kib(p.pid)
    time.sleep(1.2)
    grown = rss_kib(p.pid) - base
    assert grown < 16 * 1024, f"server RSS grew by {grown} KiB while the client did not read"
    # the client reads a little: the stream is alive and well-formed
    st, h, _ = c.response(head=True)
    assert st == 200 and h["transfer-encoding"] == "chunked"
    size = int(c._line(), 16)
    assert size == 65536 and c._take(size) == b"a" * 65536


def test_non_reading_client_pipelining_rss_bounded(echo):
    # many requests with large echoed bodies, never reading the answers: the server must
    # stop reading the socket instead of buffering every answer
    port, p = echo(max_pending=256 * 1024)
    c = Conn(port, timeout=0.5)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    body = "b" * (256 * 1024)
    req = (f"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
    base = rss_kib(p.pid)
    sent = 0
    try:
        for _ in range(400):  # 100 MiB of requests if the server kept accepting them
            c.s.sendall(req)
            sent += 1
    except socket.timeout:
        pass
    grown = rss_kib(p.pid) - base
    assert sent < 400, "server kept reading although its answers were not read"
    assert grown < 32 * 1024, f"server RSS grew by {grown} KiB"
    c.close()


def stats(port: int) -> dict:
    c = Conn(port)
    c.send(get("/stats", "Connection: close\r\n"))
    st, _, body = c.response()
    c.close()
    assert st == 200
    return json.loads(body)


def sub(d: dict, *keys):
    return tuple(d[k] for k in keys)


def test_client_disconnect_aborts_stream_and_slow(echo):
    port, _ = echo()
    a = Conn(port)
    a.send(get("/stream?n=100000&ms=5"))
    st, h, _ = a.response(head=True)
    assert st == 200 and h["transfer-encoding"] == "chunked"
    assert a._line() == b"6"
    b = Conn(port)
    b.send(get("/slow?ms=5000"))
    time.sleep(0.1)
    assert sub(stats(port), "connections", "aborts") == (3, 0)
    a.close()
    b.close()
    deadline = time.monotonic() + 3
    while stats(port)["aborts"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sub(stats(port), "connections", "aborts") == (1, 2)


def test_sigterm_with_requests_in_flight_exits_cleanly(echo):
    port, p = echo()
    conns = [Conn(port) for _ in range(3)]
    conns[0].send(get("/slow?ms=10000"))
    conns[1].send(get("/stream?n=100000&ms=5"))
    conns[2].send("GET /partial HTTP/1.1\r\nHost")
    conns.append(ws_connect(port))  # an open WebSocket too
    time.sleep(0.2)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=5) == 0, p.stderr.read()
    assert time.monotonic() - t0 < 2
    for c in conns:
        assert c.closed(drain=True)


def test_client_that_stops_reading_is_closed_after_idle_timeout(echo):
    port, _ = echo(idle_ms=500, max_pending=64 * 1024)
    c = Conn(port)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    c.send(get("/stream?n=100000&ms=1&size=16384"))
    time.sleep(0.3)
    assert stats(port)["aborts"] == 0
    deadline = time.monotonic() + 4
    while stats(port)["aborts"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sub(stats(port), "connections", "aborts") == (1, 1)
    assert c.closed(drain=True)


# ---- WebSocket ----------------------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_connect(port: int, prefix: str = "") -> Conn:
    import base64
    import hashlib
    key = base64.b64encode(os.urandom(16)).decode()
    c = Conn(port)
    c.send(prefix + f"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    if prefix:
        assert c.response()[0] == 200
    st, h, _ = c.response(head=True)
    assert st == 101 and h["upgrade"].lower() == "websocket" and h["connection"].lower() == "upgrade"
    want = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    assert h["sec-websocket-accept"] == want
    return c


def ws_frame(op: int, payload: bytes, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv | op])
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([m | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def ws_recv(c: Conn):
    """-> (fin, opcode, payload); server frames must be unmasked."""
    b0, b1 = c._take(2)
    assert not b1 & 0x80, "server frames must not be masked"
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(c._take(2), "big")
    elif n == 127:
        n = int.from_bytes(c._take(8), "big")
    return bool(b0 & 0x80), b0 & 0x0F, c._take(n)


def ws_close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big")


def test_ws_echo_fragments_ping_and_close_handshake(echo):
    port, _ = echo()
    c = ws_connect(port)
    c.send(ws_frame(1, "héllo".encode()))
    assert ws_recv(c) == (True, 1, "héllo".encode())
    c.send(ws_frame(2, bytes(range(256)) * 300))  # 64-bit length form
    assert ws_recv(c) == (True, 2, bytes(range(256)) * 300)
    # a fragmented text message with a ping between its fragments
    c.send(ws_frame(1, b"frag", fin=False) + ws_frame(9, b"p1") + ws_frame(0, b"men", fin=False)
           + ws_frame(0, b"ted", fin=True))
    assert ws_recv(c) == (True, 10, b"p1")
    assert ws_recv(c) == (True, 1, b"fragmented")
    c.send(ws_frame(1, b"big:70000"))
    assert ws_recv(c) == (True, 1, b"w" * 70000)
    c.send(ws_frame(8, (1000).to_bytes(2, "big") + b"done"))
    fin, op, payload = ws_recv(c)
    assert op == 8 and ws_close_code(payload) == 1000
    assert c.closed()
    assert sub(stats(port), "ws_closes", "ws_last_code") == (1, 1000)


def test_ws_server_initiated_close(echo):
    port, _ = echo()
    c = ws_connect(port)
    c.send(ws_frame(1, b"close"))
    fin, op, payload = ws_recv(c)
    assert op == 8 and ws_close_code(payload) == 1000 and payload[2:] == b"bye"
    c.send(ws_frame(8, (1000).to_bytes(2, "big")))
    assert c.closed()
    assert sub(stats(port), "ws_closes", "ws_last_code") == (1, 1000)


@pytest.mark.parametrize("frame, code", [
    (ws_frame(1, b"x", mask=False), 1002),                       # unmasked client frame
    (ws_frame(1, b"x", rsv=0x40), 1002),                         # reserved bit without extension
    (ws_frame(0, b"x"), 1002),                                   # continuation without a message
    (ws_frame(9, b"x", fin=False), 1002),                        # fragmented control frame
    (ws_frame(1, b"\xc3\x28"), 1007),                            # invalid UTF-8
    (ws_frame(2, b"z" * 3000), 1009),                            # over max_body (2000)
])
def test_ws_protocol_errors_close_with_code(echo, frame, code):
    port, _ = echo(max_body=2000)
    c = ws_connect(port)
    c.send(frame)
    fin, op, payload = ws_recv(c)
    assert op == 8 and ws_close_code(payload) == code, payload
    assert c.closed()
    assert sub(stats(port), "ws_closes", "ws_last_code") == (1, code)


def test_ws_upgrade_after_pipelined_request_and_disconnect(echo):
    port, _ = echo()
    c = ws_connect(port, prefix=get("/before"))  # 101 comes after the earlier answer
    c.send(ws_frame(1, b"hi"))
    assert ws_recv(c) == (True, 1, b"hi")
    c.close()  # no close frame: on_close gets 1006
    deadline = time.monotonic() + 3
    while stats(port)["ws_closes"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sub(stats(port), "ws_closes", "ws_last_code") == (1, 1006)


def test_ws_accept_on_plain_request_is_400(echo):
    port, _ = echo()
    c = Conn(port)
    c.send(get("/ws"))
    st, _, body = c.response()
    assert st == 400 and "not a WebSocket upgrade" in error_of(body)


def test_requests_split_into_single_bytes(echo):
    port, _ = echo()
    c = Conn(port)
    c.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw = ("POST /one HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
           + get("/two", "X-Long-Header-Name: some value\r\n"))
    for ch in raw.encode():
        c.send(bytes([ch]))
        time.sleep(0.001)
    j1, j2 = json.loads(c.response()[2]), json.loads(c.response()[2])
    assert j1["path"] == "/one" and j1["body"] == "abc"
    assert j2["path"] == "/two" and ["x-long-header-name", "some value"] in j2["headers"]


def test_many_headers_in_order(echo):
    port, _ = echo()
    c = Conn(port)
    c.send(get("/h", "".join(f"X-H{i}: v{i}\r\n" for i in range(100))))
    hs = json.loads(c.response()[2])["headers"]
    assert hs == [["host", "t"]] + [[f"x-h{i}", f"v{i}"] for i in range(100)]


def test_slow_but_steady_reader_is_not_cut_off(echo):
    # idle_timeout also bounds a client that stopped reading, but one that reads slowly
    # for longer than idle_timeout still gets the whole answer
    port, _ = echo(idle_ms=300)
    c = Conn(port)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    n = 2 << 20
    c.send(f"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n" + "q" * n)
    got = b""
    t0 = time.monotonic()
    while f'"body_len":{n}}}'.encode() not in got[-64:]:
        d = c.s.recv(32 * 1024)
        assert d, f"closed after {len(got)} bytes"
        got += d
        time.sleep(0.01)
    assert time.monotonic() - t0 > 0.4  # longer than idle_ms
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")


def test_non_websocket_upgrade_is_ignored(echo):
    # h2c (curl --http2 on http://) and other upgrades: answered as plain HTTP/1.1, kept alive
    port, _ = echo()
    c = Conn(port)
    c.send(get("/up", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAA\r\n")
           + get("/next"))
    st, h, body = c.response()
    assert st == 200 and h["connection"] == "keep-alive" and json.loads(body)["path"] == "/up"
    assert json.loads(c.response()[2])["path"] == "/next"
    c.send("POST /up2 HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: foo\r\nContent-Length: 3\r\n\r\nabc"
           + get("/next2"))
    j = json.loads(c.response()[2])
    assert j["path"] == "/up2" and j["body"] == "abc"
    assert json.loads(c.response()[2])["path"] == "/next2"


def test_random_input_never_breaks_the_server(echo):
    # a fuzz smoke (meant for the ASan build too): mutated requests and random splits get a
    # valid answer or a 400/413/431, never a crash; afterwards the server still works
    import random
    rnd = random.Random(1234)
    port, p = echo(max_header=2048, max_body=4096)
    seeds = [
        get("/a?b=c", "X-K: v\r\n").encode(),
        b"POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x80abcd",
    ]
    for i in range(500):
        data = bytearray(b"".join(rnd.choice(seeds) for _ in range(rnd.randint(1, 3))))
        for _ in range(rnd.randint(0, 4)):
            op, at = rnd.randint(0, 2), rnd.randrange(len(data))
            if op == 0:
                data[at] = rnd.randrange(256)
            elif op == 1:
                del data[at:at + rnd.randint(1, 8)]
            else:
                data[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        c = Conn(port, timeout=3)
        c.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cut = rnd.randrange(len(data) + 1)
        try:
            c.send(bytes(data[:cut]))
            c.send(bytes(data[cut:]))
            c.s.shutdown(socket.SHUT_WR)
            while c._fill():
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        except socket.timeout:
            pass  # an incomplete request: the server waits for more, as it should
        c.close()
        for st in [int(m.split(b" ")[1]) for m in c.buf.split(b"\r\n") if m.startswith(b"HTTP/1.1 ")]:
            assert st in (101, 200, 400, 413, 417, 431, 500), (st, bytes(data))  # 500: echo of non-UTF-8
    assert p.poll() is None
    c = Conn(port)
    c.send(get("/alive"))
    assert json.loads(c.response()[2])["path"] == "/alive"



def test_ws_frames_in_the_same_packet_as_the_upgrade(echo):
    port, _ = echo()
    c = Conn(port)
    c.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
           + ws_frame(1, b"early") + ws_frame(1, b"bird"))
    st, h, _ = c.response(head=True)
    assert st == 101 and h["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert ws_recv(c) == (True, 1, b"early")
    assert ws_recv(c) == (True, 1, b"bird")


def test_204_has_no_body_and_keeps_the_connection(echo):
    port, _ = echo()
    c = Conn(port)
    c.send(get("/nocontent") + get("/after"))
    st, h, _ = c.response()
    assert st == 204 and "content-length" not in h
    assert json.loads(c.response()[2])["path"] == "/after"  # no stray body bytes in between


def test_ws_quiet_client_is_pinged_then_dropped(echo):
    port, _ = echo(idle_ms=300)
    c = ws_connect(port)
    t0 = time.monotonic()
    fin, op, payload = ws_recv(c)  # quiet for idle_ms: the server pings
    assert op == 9 and 0.25 <= time.monotonic() - t0 < 2
    c.send(ws_frame(10, payload))  # pong: alive
    fin, op, _ = ws_recv(c)
    assert op == 9  # quiet again: pinged again, and this time no answer
    assert c.closed(timeout=3)
    assert sub(stats(port), "ws_closes", "ws_last_code") == (1, 1006)
