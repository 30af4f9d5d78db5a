"""tests/python/test_server_openai.py — the OpenAI-compatible routes of `mneme serve`,
driven by the official `openai` Python client over a real socket."""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai", reason="pip install openai (tools/setup.sh installs it)")

from server_util import Server, sse_events  # noqa: E402

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(mneme_bin, model_path):
    s = Server(mneme_bin, model_path)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model


def test_completion_greedy_matches_cli(server, client, run_mneme, model_path):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0)
    text = r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    # the same greedy continuation as the one-sequence CLI path
    cli = run_mneme(["generate", "-m", model_path, "-p", PROMPT, "-n", "8", "--temp", "0"]).stdout
    assert cli.rstrip("\n") == text
    assert "Paris" in text


def test_completion_stream_equals_whole(server, client):
    whole = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_and_stream_with_usage(server, client):
    msgs = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "What color is the sky?"}]
    r = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=12, temperature=0)
    m = r.choices[0].message
    assert m.role == "assistant" and m.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.object == "chat.completion"
    stream = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == m.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_chat_ends_with_stop_at_end_of_turn(server, client):
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=200, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 200
    assert "<|im_end|>" not in r.choices[0].message.content


def test_stop_strings(server, client):
    base = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    word = base.split()[1] if len(base.split()) > 1 else base.split()[0]
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[word, "zzzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[:base.index(word)]
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, stop=word)
    assert r.choices[0].text == base[:base.index(word)]


def test_seed_repeats_and_sampling_params(server, client):
    kw = dict(model=server.model, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    # penalties are accepted and change nothing about the shape of the answer
    r = client.completions.create(model=server.model, prompt="one one one one", max_tokens=6, temperature=0,
                                  frequency_penalty=1.5, presence_penalty=1.0)
    assert r.usage.completion_tokens == 6


def test_max_completion_tokens(server, client):
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Count to fifty."}],
                                       max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_logprobs(server, client):
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0


def test_completion_token_prompt(server, run_mneme, model_path):
    out = run_mneme(["tokenize", "-m", model_path, "-p", PROMPT]).stdout
    ids = [int(l.split()[0]) for l in out.splitlines() if l.strip() and l.split()[0].isdigit() and "'" in l]
    text = server.json("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    toks = server.json("POST", "/v1/completions", {"prompt": ids, "max_tokens": 4, "temperature": 0})
    assert toks["usage"]["prompt_tokens"] == len(ids) == text["usage"]["prompt_tokens"]
    assert toks["choices"][0]["text"] == text["choices"][0]["text"]


def test_raw_sse_shape(server):
    status, data, headers = server.request("POST", "/v1/chat/completions",
                                           {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                            "temperature": 0, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    ev = sse_events(data)
    assert ev[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in ev[:-1])
    assert ev[-2]["choices"][0]["finish_reason"] == "length"


def test_health_and_metrics(server, client):
    client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, temperature=0)
    status, body, headers = server.request("GET", "/metrics")
    assert status == 200
    text = body.decode()
    for name in ("mneme_requests_total{route=\"/v1/completions\",status=\"200\"}", "mneme_generated_tokens_total",
                 "mneme_prompt_tokens_total", "mneme_time_to_first_token_seconds_bucket",
                 "mneme_inter_token_latency_seconds_count", "mneme_batch_tokens_count", "mneme_queue_depth",
                 "mneme_tier_bytes{tier=\"T1\"}", "mneme_sessions"):
        assert name in text, name
    gen = [l for l in text.splitlines() if l.startswith("mneme_generated_tokens_total ")]
    assert int(gen[0].split()[1]) >= 2
    h = json.loads(server.request("GET", "/health")[1])
    assert h["status"] == "ok" and h["model"] == server.model


def test_disconnect_cancels_completion(server):
    import socket
    import time
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "stream": True})
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    buf = b""
    while buf.count(b'"text"') < 3:
        d = s.recv(4096)
        assert d
        buf += d
    s.close()
    end = time.time() + 5
    while json.loads(server.request("GET", "/health")[1])["streams"] and time.time() < end:
        time.sleep(0.02)
    h = json.loads(server.request("GET", "/health")[1])
    assert h["streams"] == 0 and h["sessions"] == 0   # the temporary session is gone too
    _, data, _ = server.request("GET", "/metrics")
    assert b"mneme_streams_cancelled_total 1" in data


def test_pipelined_stream_is_not_a_stalled_reader(mneme_bin, model_path):
    """Two streams pipelined on one keep-alive connection: the second's events wait in the
    server until the first has ended. Waiting behind an earlier answer is not a client that
    stopped reading, even when more than --max-pending-write bytes pile up meanwhile: both
    streams run to the end (finish_reason length) and none counts as stalled."""
    import re
    import socket
    srv = Server(mneme_bin, model_path, "--max-pending-write", "4096")
    try:
        def req(n):
            body = json.dumps({"prompt": "Once upon a time", "max_tokens": n, "temperature": 0, "stream": True})
            return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        s.sendall(req(160) + req(80))   # 80 events of ~150 bytes: far over 4096 while waiting
        data = b""
        try:
            while data.count(b"data: [DONE]") < 2:
                d = s.recv(65536)
                if not d:
                    break
                data += d
        except socket.timeout:
            pass
        s.close()
        assert data.count(b"data: [DONE]") == 2, data[-600:]
        finishes = re.findall(rb'"finish_reason":"(\w+)"', data)
        assert len(finishes) == 2 and set(finishes) <= {b"length", b"stop"}, finishes
        _, metrics, _ = srv.request("GET", "/metrics")
        assert b"\nmneme_streams_stalled_total 0\n" in metrics
    finally:
        srv.close()
