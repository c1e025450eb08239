"""The access log and jaxserve_requests_rejected_total on the HTTP and gRPC front ends (a scripted
engine: no model)."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import httpx
import pytest

from grpc_fixtures import LoopThread
from http_helpers import ScriptedEngine, ServerThread, base_url
from jaxserve.demo_model import train_tokenizer
from jaxserve.entrypoints.client import Client
from jaxserve.entrypoints.grpc.server import GrpcFrontend


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def rejected(engine) -> dict[str, float]:
    return {s.labels["reason"]: s.value for m in engine.metrics.rejected.collect() for s in m.samples
            if s.name.endswith("_total")}


def test_http_refusals_counted_by_reason_and_logged(tokenizer, caplog):
    engine = ScriptedEngine(tokenizer, ["Hel", "lo"], delay=0.3)
    loop = ServerThread()
    caplog.set_level(logging.INFO, logger="jaxserve.access")
    try:
        url = base_url(loop.serve(engine, api_key="k", max_concurrent=1))
        auth = {"authorization": "Bearer k"}
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=10).status_code == 401
        with httpx.Client(timeout=30, headers=auth) as c:
            slow = threading.Thread(target=lambda: c.post(url + "/v1/completions", json={"prompt": "hi"}))
            slow.start()
            deadline = time.monotonic() + 30
            while not engine.prompts and time.monotonic() < deadline:  # the first request holds the slot
                time.sleep(0.01)
            assert c.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 429
            slow.join()
            assert c.post(url + "/v1/completions", json={"prompt": "hi", "n": 0}).status_code == 400
            assert c.get(url + "/health").status_code == 200
    finally:
        loop.close()
    assert rejected(engine) == {"unauthorized": 1.0, "rate_limited": 1.0, "invalid_request": 1.0}
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxserve.access"]
    assert len(lines) == 4 and not any("/health" in x for x in lines)
    (ok,) = [x for x in lines if " 200 " in x]
    assert ok.startswith("POST /v1/completions 200 prompt_tokens=") and "output_tokens=2 " in ok and "id=cmpl-" in ok
    assert sorted(x.split()[2] for x in lines) == ["200", "400", "401", "429"]


def test_disable_log_requests_keeps_the_counts(tokenizer, caplog):
    engine = ScriptedEngine(tokenizer, ["Hello"])
    loop = ServerThread()
    caplog.set_level(logging.INFO, logger="jaxserve.access")
    try:
        url = base_url(loop.serve(engine, log_requests=False))
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=10).status_code == 200
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "model": "x"}, timeout=10).status_code == 404
    finally:
        loop.close()
    assert not [r for r in caplog.records if r.name == "jaxserve.access"]
    assert rejected(engine) == {"not_found": 1.0}


def test_grpc_refusals_counted_and_logged(engine, caplog):
    loop = LoopThread()
    caplog.set_level(logging.INFO, logger="jaxserve.access")
    frontend = GrpcFrontend(engine, port=0, api_key="k")
    loop.run(frontend.start())
    loop.run(frontend.set_serving(True))
    before = rejected(engine)
    try:
        with Client(frontend.address, timeout=30) as anonymous:
            with pytest.raises(grpc.RpcError):
                anonymous.tokenize("hi")
            assert anonymous.health() == "SERVING"  # health needs no key and is not logged
        with Client(frontend.address, timeout=30, api_key="k") as client:
            with pytest.raises(grpc.RpcError):
                client.generate([10**6])
            assert client.tokenize("hi")
    finally:
        loop.run(frontend.stop(0))
        loop.close()
    after = rejected(engine)
    assert after.get("unauthorized", 0) - before.get("unauthorized", 0) == 1
    assert after.get("invalid_request", 0) - before.get("invalid_request", 0) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxserve.access"]
    assert [x.split()[1:3] for x in lines] == [["/jaxserve.v1.GenerationService/Tokenize", "UNAUTHENTICATED"],
                                               ["/jaxserve.v1.GenerationService/Generate", "INVALID_ARGUMENT"],
                                               ["/jaxserve.v1.GenerationService/Tokenize", "OK"]]
