"""tests/python/test_server_concurrency.py — 64 concurrent streams through the `openai`
client share engine steps (continuous batching), and each greedy stream equals the same
request run alone."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai", reason="pip install openai (tools/setup.sh installs it)")

from server_util import Server  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The quick brown fox",
           "Water boils at", "My favourite food is", "In 1492, Columbus", "The best way to learn is"]
N_STREAMS = 64
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(mneme_bin, model_path):
    s = Server(mneme_bin, model_path)
    yield s
    s.close()


def run_stream(client, model, i):
    chat = i % 2 == 1
    p = PROMPTS[i % len(PROMPTS)]
    if chat:
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], stream=True,
                                                max_tokens=MAX_TOKENS, temperature=0)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    stream = client.completions.create(model=model, prompt=p, stream=True, max_tokens=MAX_TOKENS, temperature=0)
    return "".join(c.choices[0].text for c in stream if c.choices)


def test_64_concurrent_streams_equal_alone(server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    alone = {}
    for i in range(2 * len(PROMPTS)):   # every (prompt, chat?) combination once, one at a time
        alone[i % (2 * len(PROMPTS))] = run_stream(client, server.model, i)
    assert all(alone.values())
    t0 = time.time()
    with ThreadPoolExecutor(N_STREAMS) as ex:
        futs = [ex.submit(run_stream, client, server.model, i) for i in range(N_STREAMS)]
        got = [f.result() for f in futs]
    elapsed = time.time() - t0
    for i, text in enumerate(got):
        assert text == alone[i % (2 * len(PROMPTS))], f"stream {i}: {text!r} != alone {alone[i % 16]!r}"
    # they really shared steps: many tokens per step on average
    _, data, _ = server.request("GET", "/metrics")
    m = dict(l.rsplit(" ", 1) for l in data.decode().splitlines() if l.startswith("mneme_batch_tokens_"))
    steps, tokens = float(m["mneme_batch_tokens_count"]), float(m["mneme_batch_tokens_sum"])
    assert tokens / steps > 2, (tokens, steps)
    print(f"64 streams x {MAX_TOKENS} tokens in {elapsed:.2f} s; {tokens / steps:.1f} tokens per step on average")


def test_concurrent_sessions_and_completions_mix(server):
    """Session appends and completions at the same time: nothing waits for anything else."""
    sids = [server.json("POST", "/v1/sessions", {})["id"] for _ in range(8)]
    errors = []

    def worker(k):
        try:
            sid = sids[k]
            server.json("POST", f"/v1/sessions/{sid}/messages", {"role": "user", "content": PROMPTS[k]})
            st, data, _ = server.request("POST", f"/v1/sessions/{sid}/generate", {"max_tokens": 4, "temperature": 0})
            assert st == 200 and data.endswith(b"data: [DONE]\n\n")
            r = server.json("POST", "/v1/completions", {"prompt": PROMPTS[k], "max_tokens": 3, "temperature": 0})
            assert r["usage"]["completion_tokens"] == 3
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for sid in sids:
        server.json("DELETE", f"/v1/sessions/{sid}")


def test_long_prefill_is_chunked_beside_a_stream(mneme_bin, model_path):
    """A long prompt is computed in chunks under --max-batch-tokens while another stream
    decodes: no step is larger than the budget, and the stream gets its tokens meanwhile."""
    srv = Server(mneme_bin, model_path, "--max-batch-tokens", "64")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=120)
        stamps = []

        def decode():
            for c in client.completions.create(model=srv.model, prompt="Once upon a time", max_tokens=40, temperature=0,
                                               stream=True):
                if c.choices and c.choices[0].text:
                    stamps.append(time.time())

        t = threading.Thread(target=decode)
        t.start()
        while not stamps:
            time.sleep(0.01)
        t_long = time.time()
        r = client.completions.create(model=srv.model, prompt="word " * 800, max_tokens=1, temperature=0)
        t_done = time.time()
        t.join(60)
        assert r.usage.prompt_tokens >= 800
        _, data, _ = srv.request("GET", "/metrics")
        m = dict(l.rsplit(" ", 1) for l in data.decode().splitlines() if l.startswith("mneme_batch_tokens_"))
        assert m['mneme_batch_tokens_bucket{le="64"}'] == m["mneme_batch_tokens_count"], m
        during = [s for s in stamps if t_long <= s <= t_done]
        assert len(during) >= 3 or stamps[-1] < t_done, (len(during), len(stamps))   # decoding went on during the prefill
    finally:
        srv.close()
