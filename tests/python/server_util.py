"""tests/python/server_util.py — run `mneme serve` for the server tests.

Server(mneme_bin, model_path, *flags) starts build/mneme serve (one compute thread by
default: the loop thread and the test's clients need a core too; on a loaded 2-core
machine -t 2 was 2-10x slower) on a free loopback port
(--port 0; the bound port is read from the "listening on" line), waits for /health, and
stop() sends SIGTERM and requires exit status 0 within a timeout. Helpers speak plain HTTP
(http.client) so tests can send malformed bodies, and parse SSE streams.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


class Server:
    def __init__(self, mneme_bin: Path, model_path: Path, *flags: str, threads: int = 1):
        self.log = tempfile.NamedTemporaryFile(prefix="mneme-serve-", suffix=".log", delete=False)
        args = [str(mneme_bin), "serve", "-m", str(model_path), "--port", "0", "-t", str(threads), *flags]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log)
        self.port = self._wait_port()
        self.model = Path(model_path).name.removesuffix(".gguf")
        self.base = f"http://127.0.0.1:{self.port}"
        self._wait_health()

    def stderr(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def _wait_port(self, timeout: float = 30.0) -> int:
        end = time.time() + timeout
        while time.time() < end:
            m = re.search(r"listening on http://[^:]+:(\d+)", self.stderr())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                pytest.fail(f"mneme serve exited with {self.proc.returncode}:\n{self.stderr()}", pytrace=False)
            time.sleep(0.05)
        self.proc.kill()
        pytest.fail(f"mneme serve did not start within {timeout}s:\n{self.stderr()}", pytrace=False)

    def _wait_health(self, timeout: float = 10.0):
        end = time.time() + timeout
        while time.time() < end:
            try:
                status, body, _ = self.request("GET", "/health")
                if status == 200 and json.loads(body)["status"] == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"/health never answered:\n{self.stderr()}", pytrace=False)

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 60.0):
        """-> (status, body bytes, headers dict with lower-case names)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            h = {"Content-Type": "application/json"} if body is not None else {}
            h.update(headers or {})
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            return r.status, data, {k.lower(): v for k, v in r.getheaders()}
        finally:
            c.close()

    def json(self, method: str, path: str, body=None, headers=None, expect: int = 200):
        status, data, _ = self.request(method, path, body, headers)
        assert status == expect, f"{method} {path}: {status} {data[:500]!r}"
        return json.loads(data) if data and not data.startswith(b"data:") else data

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"mneme serve did not exit within {timeout}s of SIGTERM:\n{self.stderr()}", pytrace=False)
        rc = self.proc.returncode
        return rc

    def close(self):
        rc = self.stop()
        text = self.stderr()
        os.unlink(self.log.name)
        assert rc == 0, f"mneme serve exit status {rc}:\n{text}"


def sse_events(data: bytes) -> list:
    """Parse an SSE body into its data payloads: dicts, and the string '[DONE]'."""
    out = []
    for block in data.decode().split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data line: {block!r}"
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class WS:
    """A minimal WebSocket client (RFC 6455): JSON text frames, masked as a client must."""

    def __init__(self, port: int, path: str, headers=None, timeout: float = 30.0):
        import base64
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        h = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{h}\r\n".encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            d = self.s.recv(4096)
            if not d:
                break
            self.buf += d
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ")[1]) if head else 0

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("websocket closed")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self, opcode: int, payload: bytes):
        import struct
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, obj):
        self._frame(1, json.dumps(obj).encode())

    def recv(self):
        """The next JSON message; None when the server closed."""
        import struct
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            op = b0 & 0x0F
            if op == 1:
                return json.loads(payload)
            if op == 8:
                return None
            if op == 9:
                self._frame(10, payload)

    def close(self):
        try:
            self._frame(8, b"\x03\xe8")
        except OSError:
            pass
        self.s.close()


def metric(server, name):
    """The value of the /metrics line that starts with name (labels included)."""
    _, body, _ = server.request("GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")
