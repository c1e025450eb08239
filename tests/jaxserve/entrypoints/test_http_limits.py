"""HTTP request limits on a real server (issue 13, item 5): body-size limit (413, up front and
while a chunked body arrives), read timeout for slow bodies (408) without an admission slot
held, quiet client disconnects mid-upload, and 1 MB requests that stall neither /health nor
a concurrent stream (tokenization and templates run in the worker pool, off the event loop
and off the engine thread)."""

from __future__ import annotations

import json
import logging
import random
import socket
import string
import threading
import time

import httpx
import pytest

from engine_fixtures import write_engine_test_model
from http_helpers import CPU, MODEL, ServerThread, base_url
from jaxserve import AsyncLLM, LLM

LIMIT = 64 * 1024
READ_TIMEOUT = 3.0  # s; long enough that a whole request beside stalled uploads finishes first
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("http-limits-model")
    write_engine_test_model(path)
    a = AsyncLLM(engine=LLM(str(path), config=CPU).engine, model_name=MODEL)
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def loop():
    st_ = ServerThread()
    yield st_
    st_.close()


@pytest.fixture(scope="module")
def small(engine, loop):
    """Small limits, one request at a time."""
    return loop.serve(engine, max_request_body_bytes=LIMIT, request_read_timeout=READ_TIMEOUT, max_concurrent=1)


@pytest.fixture(scope="module")
def default(engine, loop):
    return loop.serve(engine)


def raw(frontend, head: bytes, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", frontend.port), timeout=30)
    s.sendall(head + body)
    return s


def head(path: str, length: int | None = None, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    header, _, rest = data.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    length = int(next(line.split(b":", 1)[1] for line in header.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, json.loads(rest[:length])


def test_body_over_limit_is_413_before_and_while_reading(small):
    s = raw(small, head("/v1/completions", LIMIT + 1))  # Content-Length alone: nothing of the body sent
    status, body = read_response(s)
    s.close()
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert str(LIMIT) in body["error"]["message"] and "max_request_body_bytes" in body["error"]["message"]

    s = raw(small, head("/tokenize", chunked=True))  # chunked: counted as it arrives
    piece = b"x" * 8192
    for _ in range(LIMIT // len(piece) + 1):
        s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    status, body = read_response(s)
    s.close()
    assert status == 413 and str(LIMIT) in body["error"]["message"]

    ok = httpx.post(base_url(small) + "/tokenize", json={"prompt": "a " * (LIMIT // 4)}, timeout=30)
    assert ok.status_code == 200  # under the limit: served


def test_slow_body_gets_408_and_holds_no_slot(small):
    body = json.dumps(COMPLETION).encode()
    start = time.monotonic()
    slow = [raw(small, head("/v1/completions", len(body)), body[:len(body) // 2]) for _ in range(3)]
    # max_concurrent is 1, three uploads are stalled: a whole request still gets in
    r = httpx.post(base_url(small) + "/v1/completions", json=COMPLETION, timeout=30)
    assert r.status_code == 200, r.text
    assert time.monotonic() - start < READ_TIMEOUT
    for s in slow:
        status, err = read_response(s)
        s.close()
        assert status == 408 and err["error"]["code"] == "request_timeout"
        assert "read timeout" in err["error"]["message"]
    waited = time.monotonic() - start
    print(f"\nslow bodies answered 408 after {waited:.2f} s (read timeout {READ_TIMEOUT} s)")
    assert READ_TIMEOUT * 0.9 <= waited < READ_TIMEOUT + 5
    assert small.state.in_flight == 0


def test_disconnect_mid_upload_is_quiet(small, caplog):
    uvicorn_log = logging.getLogger("uvicorn")  # uvicorn's loggers do not propagate to the root
    uvicorn_log.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    try:
        body = json.dumps(COMPLETION).encode()
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
            s = raw(small, head(path, len(body)), body[:10])
            time.sleep(0.1)
            s.close()
        time.sleep(0.5)
        r = httpx.post(base_url(small) + "/v1/completions", json=COMPLETION, timeout=30)
        assert r.status_code == 200
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    assert small.state.in_flight == 0


def one_mb_text() -> str:
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(2000)]
    return " ".join(rng.choices(words, k=200_000))[:1 << 20]


def stream_gaps(url: str, max_tokens: int, first: threading.Event | None = None,
                until: threading.Event | None = None) -> float:
    """The longest gap (s) between a stream's chunks after its first; with `until`, the
    stream is left (aborted) a few chunks after that event is set."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True}
    times: list[float] = []
    after = 0  # chunks since `until` was set
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.monotonic())
                if first is not None and len(times) == 1:
                    first.set()
                if until is not None and until.is_set():
                    after += 1
                    if after > 5:
                        break
    left_early = until is not None and until.is_set()  # a later stream may stop after a few chunks
    assert len(times) >= (2 if left_early else min(10, max_tokens))
    return max(b - a for a, b in zip(times, times[1:]))


def test_one_mb_request_stalls_neither_health_nor_a_stream(default):
    url = base_url(default)
    text = one_mb_text()
    max_tokens = 480
    stream_gaps(url, 8)  # warm
    alone = stream_gaps(url, max_tokens)

    first = threading.Event()
    result: dict = {}
    health: list[float] = []
    big_done = threading.Event()

    def big():
        first.wait(30)
        with httpx.Client(base_url=url, timeout=60) as c:
            t0 = time.monotonic()
            result["completion"] = c.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 4})
            result["tokenize"] = c.post("/tokenize", json={"prompt": text})
            chat = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
            result["chat"] = c.post("/v1/chat/completions", json=chat)
            result["big_s"] = time.monotonic() - t0
            result["big_end"] = time.monotonic()
        big_done.set()

    def poll_health():
        first.wait(30)
        with httpx.Client(base_url=url, timeout=30) as c:
            while not big_done.is_set():
                t0 = time.monotonic()
                assert c.get("/health").status_code == 200
                health.append(time.monotonic() - t0)
                time.sleep(0.01)

    threads = [threading.Thread(target=big), threading.Thread(target=poll_health)]
    for t in threads:
        t.start()
    together, deadline = 0.0, time.monotonic() + 60
    while time.monotonic() < deadline:  # streams one after another until the 1 MB requests are
        together = max(together, stream_gaps(url, max_tokens, first, until=big_done))  # done
        if big_done.is_set():
            break
    stream_end = time.monotonic()
    for t in threads:
        t.join(60)
    assert big_done.is_set()
    assert result["big_end"] < stream_end, "the stream ended before the 1 MB requests did: measure nothing"
    assert result["completion"].status_code == 400
    err = result["completion"].json()["error"]
    assert err["param"] == "prompt" and "max_model_len" in err["message"] and "characters" in err["message"]
    assert result["chat"].status_code == 400 and result["chat"].json()["error"]["param"] == "messages"
    tok = result["tokenize"]
    assert tok.status_code == 200 and tok.json()["count"] == len(tok.json()["tokens"]) > 100_000
    print(f"\n1 MB requests took {result['big_s']:.2f} s; /health max {max(health) * 1e3:.1f} ms over "
          f"{len(health)} probes; stream's longest gap alone {alone * 1e3:.1f} ms, "
          f"beside the 1 MB requests {together * 1e3:.1f} ms")
    # The times are reported, not asserted (a shared machine's noise is not a test result; the
    # tokenizer holds the GIL for ~50-75 ms on 1 MB): that the work runs off the event loop is
    # checked without a clock by test_health_and_a_stream_are_served_while_a_tokenization_is_held.
    assert health, "no /health probe was answered while the 1 MB requests ran"


def test_health_and_a_stream_are_served_while_a_tokenization_is_held(default, monkeypatch):
    """A 1 MB /tokenize is held inside the tokenizer (in the worker pool) until the test has
    been served: /health, a whole stream and a completion. Were tokenization on the event loop,
    none of them could be answered while it is held (each call would time out)."""
    from jaxserve.entrypoints.openai import app

    url = base_url(default)
    entered, release = threading.Event(), threading.Event()
    real = app._encode

    def held_encode(tokenizer, text, add_special_tokens):
        if len(text) > 500_000:
            entered.set()
            assert release.wait(120), "the test never released the tokenization"
        return real(tokenizer, text, add_special_tokens)

    monkeypatch.setattr(app, "_encode", held_encode)
    result: dict = {}

    def big():
        result["tokenize"] = httpx.post(url + "/tokenize", json={"prompt": one_mb_text()}, timeout=180)

    thread = threading.Thread(target=big)
    thread.start()
    try:
        assert entered.wait(60), "the 1 MB prompt never reached the tokenizer"
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(3):
                assert c.get("/health").status_code == 200
            assert c.post("/v1/completions", json=COMPLETION).status_code == 200
        stream_gaps(url, 16)  # at least 10 chunks, all while the tokenization is held
        assert not result, "the 1 MB request finished before it was released"
    finally:
        release.set()
        thread.join(180)
    tok = result["tokenize"]
    assert tok.status_code == 200 and tok.json()["count"] > 100_000
