"""tests/python/server_util.py — run `mneme serve` for the server tests.

Server(mneme_bin, model_path, *flags) starts build/mneme serve on a free loopback port
(--port 0; the bound port is read from the "listening on" line), waits for /health, and
stop() sends SIGTERM and requires exit status 0 within a timeout. Helpers speak plain HTTP
(http.client) so tests can send malformed bodies, and parse SSE streams.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


class Server:
    def __init__(self, mneme_bin: Path, model_path: Path, *flags: str, threads: int = 2):
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
