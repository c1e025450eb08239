"""Front ends built before the engine exists (`jaxserve serve` binds its ports first): probes
and refusals while starting, after attach, during warm-up and during a drain."""

from __future__ import annotations

import grpc
import httpx
import pytest

from grpc_fixtures import LoopThread
from http_helpers import ScriptedEngine, ServerThread, base_url
from jaxserve.demo_model import train_tokenizer
from jaxserve.entrypoints.client import Client
from jaxserve.entrypoints.grpc.server import GrpcFrontend
from jaxserve.entrypoints.openai import HttpFrontend
from jaxserve.sampling_params import SamplingParams


def probes(url: str) -> tuple:
    return tuple(f"{r.status_code} {r.json()['status']}" for r in
                 (httpx.get(url + p, timeout=10) for p in ("/health", "/ready", "/live")))


def test_http_starting_attached_serving_draining():
    loop = ServerThread()
    frontend = HttpFrontend(None, host="127.0.0.1", port=0, served_model_name="m")
    loop.run(frontend.start())
    url = base_url(frontend)
    try:
        assert probes(url) == ("503 starting", "503 starting", "200 alive")
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_starting"
        engine = ScriptedEngine(train_tokenizer(), ["Hello"])
        frontend.attach(engine)  # loaded, warming up
        assert probes(url) == ("503 starting", "503 starting", "200 alive")
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_starting"
        assert httpx.post(url + "/tokenize", json={"prompt": "hi"}, timeout=10).status_code == 200
        loop.run(frontend.set_serving(True))
        assert probes(url) == ("200 ok", "200 ok", "200 alive")
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=10).status_code == 200
        loop.run(frontend.drain(1.0))
        assert probes(url) == ("503 draining", "503 draining", "200 alive")
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=10).status_code == 503
        assert httpx.get(url + "/metrics", timeout=10).status_code == 200
        engine.healthy = False  # the engine shut down at the end of the drain: still "draining"
        assert probes(url)[0] == "503 draining"
    finally:
        loop.run(frontend.close())
        loop.close()


def test_http_dead_engine_fails_live():
    loop = ServerThread()
    engine = ScriptedEngine(train_tokenizer(), ["Hello"])
    frontend = loop.serve(engine)
    try:
        engine.healthy = False
        assert probes(base_url(frontend)) == ("503 engine not running",) * 2 + ("503 engine not running",)
    finally:
        loop.close()


def test_http_draining_before_the_engine_loaded():
    loop = ServerThread()
    frontend = HttpFrontend(None, host="127.0.0.1", port=0, served_model_name="m")
    loop.run(frontend.start())
    try:
        frontend.start_draining()  # SIGTERM during the load
        assert probes(base_url(frontend)) == ("503 draining", "503 draining", "200 alive")
        frontend.attach(ScriptedEngine(train_tokenizer(), ["Hello"]))
        assert probes(base_url(frontend)) == ("503 draining", "503 draining", "200 alive")
    finally:
        loop.run(frontend.close())
        loop.close()


def test_bad_http_options_fail_before_any_engine():
    with pytest.raises(ValueError, match="max_concurrent"):
        HttpFrontend(None, port=0, served_model_name="m", max_concurrent=0)
    with pytest.raises(ValueError, match="generation_config"):
        HttpFrontend(None, port=0, served_model_name="m", generation_config="/no/such/dir")


def test_grpc_starting_then_serving_then_draining(engine):
    loop = LoopThread()
    frontend = GrpcFrontend(None, port=0)
    loop.run(frontend.start())
    try:
        with Client(frontend.address, timeout=10) as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as e:
                client.generate("hi", SamplingParams(max_tokens=2))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in e.value.details()
            for call in (client.model_info, lambda: client.tokenize("hi")):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            frontend.attach(engine)
            assert client.health() == "NOT_SERVING"  # warming up: only the warm-up generates
            assert client.tokenize("hi") and client.model_info().max_model_len == engine.max_model_len
            with pytest.raises(grpc.RpcError) as e:
                client.generate("hi", SamplingParams(max_tokens=2))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            loop.run(frontend.set_serving(True))
            assert client.health() == "SERVING"
            assert client.generate("hi", SamplingParams(max_tokens=2, temperature=0.0)).outputs[0].token_ids
            loop.run(frontend.drain(1.0))
            assert client.health() == "NOT_SERVING"  # answered, not refused, until close()
            with pytest.raises(grpc.RpcError) as e:
                client.generate("hi", SamplingParams(max_tokens=2))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.run(frontend.close())
        loop.close()
