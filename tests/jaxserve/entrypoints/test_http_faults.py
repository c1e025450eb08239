"""A failure traced to one request is a 500 with a JSON body for that request only (or an
error event in its stream); the server keeps serving everyone else."""

from __future__ import annotations

import json

import httpx
import pytest

from engine_fixtures import write_engine_test_model
from http_helpers import CPU, MODEL, ServerThread, base_url
from jaxserve import AsyncLLM, LLM
from jaxserve.engine import faults

GREEDY = {"model": MODEL, "max_tokens": 6, "temperature": 0.0}


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    path = tmp_path_factory.mktemp("http-faults-model")
    write_engine_test_model(path)
    engine = AsyncLLM(engine=LLM(str(path), config=CPU).engine, model_name=MODEL)
    loop = ServerThread()
    frontend = loop.serve(engine)
    with httpx.Client(base_url=base_url(frontend), timeout=60) as client:
        yield engine, client
    loop.close()
    engine.shutdown()


def test_traced_request_failure_is_a_500_for_that_request_only(http):
    engine, client = http
    before = client.post("/v1/completions", json={**GREEDY, "prompt": "Hello there"}).json()["choices"][0]["text"]
    with faults.installed(engine.engine, faults.Faults(request_marker="BOOM")):
        bad = client.post("/v1/completions", json={**GREEDY, "prompt": "BOOM goes this one"})
        assert bad.status_code == 500
        error = bad.json()["error"]
        assert error["code"] == "request_failed" and "failed" in error["message"]
        with client.stream("POST", "/v1/completions", json={**GREEDY, "prompt": "BOOM again", "stream": True}) as r:
            body = "\n".join(r.iter_lines())
        # It fails on its first token, before the stream starts: the same JSON 500; had it failed
        # later, the stream would end with this error as its last event.
        last = json.loads(body) if r.status_code != 200 else json.loads(
            [line for line in body.splitlines() if line.startswith("data: {")][-1][6:])
        assert r.status_code in (200, 500) and last["error"]["code"] == "request_failed"
        good = client.post("/v1/completions", json={**GREEDY, "prompt": "Hello there"})
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == before
    assert client.get("/health").status_code == 200 and engine.healthy
