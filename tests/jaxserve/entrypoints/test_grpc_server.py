"""The gRPC front end on 127.0.0.1 over a real engine (tiny model, CPU preset): outputs equal
LLM.generate, JetStream Decode, cancellation and deadlines free pages, validation, the
concurrency cap, API key, TLS, health, reflection and engine failure."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_fixtures import VOCAB, write_engine_test_model
from grpc_fixtures import BearerInterceptor, FailingEngine, LoopThread, wait_engine_idle
from jaxserve import LLM, AsyncLLM, SamplingParams
from jaxserve.entrypoints.client import AsyncClient, Client
from jaxserve.engine import faults
from jaxserve.outputs import merge_delta
from jaxserve.protos import jetstream_pb2 as js
from jaxserve.protos import jetstream_pb2_grpc as js_grpc
from jaxserve.protos.v1 import generate_pb2 as pb
from jaxserve.protos.v1 import generate_pb2_grpc as pb_grpc

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
KEY = "test-key-0123456789"
AUTH = (("authorization", f"Bearer {KEY}"),)
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpc-model")
    write_engine_test_model(path)
    return LLM(str(path), config=CPU)


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def engine(llm):
    a = AsyncLLM(engine=llm.engine)  # shares the compiled engine; LLM is only used while it is idle
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def server(loop, engine):
    """THE server of this module: API key on, no concurrency cap."""
    frontend = loop.start_frontend(engine, api_key=KEY)
    yield frontend
    loop.run(frontend.stop(0))


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, api_key=KEY, timeout=60) as c:
        yield c


def expected(llm, engine, prompts, params):
    wait_engine_idle(engine)
    return llm.generate(prompts, params, use_tqdm=False)


def summary(out):
    return [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in out.outputs]


def assert_logprobs_match(got, want):
    for g, w in zip(got.outputs, want.outputs):
        assert (g.logprobs is None) == (w.logprobs is None)
        for gd, wd in zip(g.logprobs or (), w.logprobs or ()):
            assert {t: lp.rank for t, lp in gd.items()} == {t: lp.rank for t, lp in wd.items()}
            assert all(math.isclose(gd[t].logprob, wd[t].logprob, abs_tol=1e-4) for t in wd)


async def stream_collect(client, prompt, params, **kw):
    acc = None
    async for delta in client.generate_stream(prompt, params, **kw):
        acc = merge_delta(acc, delta)
    return acc


def test_stream_and_unary_equal_llm_generate(llm, engine, client, server):
    greedy = expected(llm, engine, "Hello world", SamplingParams(max_tokens=12, **GREEDY))[0].outputs[0]
    cases = [
        ("Hello world", SamplingParams(max_tokens=12, **GREEDY)),
        ([5, 6, 7, 8, 9], SamplingParams(max_tokens=10, temperature=0.0)),
        ("The capital of France is", SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=7)),
        ("One, two, three", SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)),
        ("Hello", SamplingParams(max_tokens=6, logprobs=3, **GREEDY)),
        ("Hello world", SamplingParams(max_tokens=12, stop=[greedy.text[4:7]], **GREEDY)),
        ("Hello world", SamplingParams(max_tokens=12, stop_token_ids=[greedy.token_ids[5]], **GREEDY)),
        ("Hello world", SamplingParams(max_tokens=10, repetition_penalty=1.3, presence_penalty=0.5,
                                       frequency_penalty=0.5, **GREEDY)),
        ("A B C", SamplingParams(max_tokens=10, temperature=0.7, top_p=0.9, min_p=0.1, seed=11)),
        ("A B C", SamplingParams(max_tokens=5, logit_bias={100: 50.0}, **GREEDY)),
        ([9, 8, 7] * 160, SamplingParams(max_tokens=None, min_tokens=3, temperature=0.0)),  # up to the context
    ]
    want = [expected(llm, engine, p, s)[0] for p, s in cases]
    assert want[5].outputs[0].finish_reason == "stop" and isinstance(want[5].outputs[0].stop_reason, str)
    assert want[6].outputs[0].stop_reason == greedy.token_ids[5]

    async def streams():
        async with AsyncClient(server.address, api_key=KEY, timeout=60) as c:
            return await asyncio.gather(*(stream_collect(c, p, s) for p, s in cases))

    streamed = asyncio.run(streams())
    unary = [client.generate(p, s) for p, s in cases]
    for (prompt, _), s, u, w in zip(cases, streamed, unary, want):
        assert summary(s) == summary(w), prompt
        assert summary(u) == summary(w), prompt
        assert s.prompt_token_ids == u.prompt_token_ids == w.prompt_token_ids
        assert_logprobs_match(s, w)
        assert_logprobs_match(u, w)
    assert wait_engine_idle(engine)["num_free_pages"] == engine.stats()["num_total_pages"]


def test_stream_messages_carry_usage_and_finish(server):
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.GenerationServiceStub(channel)
    request = pb.GenerateRequest(request_id="usage-1", text="Hello world",
                                 sampling_params=pb.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    msgs = list(stub.GenerateStream(request, metadata=AUTH, timeout=60))
    assert [m.request_id for m in msgs] == ["usage-1"] * 5
    assert len(msgs[0].prompt_token_ids) > 0 and not any(m.prompt_token_ids for m in msgs[1:])
    assert [m.finished for m in msgs] == [False] * 4 + [True]
    assert [m.delta.finish_reason for m in msgs[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * 4
    assert msgs[-1].delta.finish_reason == pb.FINISH_REASON_LENGTH
    assert msgs[-1].usage == pb.Usage(prompt_tokens=len(msgs[0].prompt_token_ids), completion_tokens=5,
                                      cached_prompt_tokens=msgs[-1].usage.cached_prompt_tokens)
    assert not any(m.HasField("usage") for m in msgs[:-1])
    unary = stub.Generate(request, metadata=AUTH, timeout=60)
    assert unary.usage.completion_tokens == 5 and unary.request_id == "usage-1"
    channel.close()


PROMPTS = ["Hello world", "The capital of France is", "One, two, three", [5, 6, 7, 8, 9]]


def test_32_concurrent_streams_are_token_exact(llm, engine, server):
    prompts = [PROMPTS[i % 4] if i % 3 else f"Request number {i}:" for i in range(32)]
    params = SamplingParams(max_tokens=16, **GREEDY)
    want = expected(llm, engine, prompts, params)

    async def main():
        async with AsyncClient(server.address, api_key=KEY, timeout=120) as c:
            return await asyncio.gather(*(stream_collect(c, p, params) for p in prompts))

    got = asyncio.run(main())
    assert [summary(g) for g in got] == [summary(w) for w in want]


def test_jetstream_decode_streams_the_same_tokens(llm, engine, server):
    want = expected(llm, engine, ["Hello world", [5, 6, 7, 8, 9]], SamplingParams(max_tokens=12, temperature=0.0))
    with grpc.insecure_channel(server.address) as channel:
        stub = js_grpc.OrchestratorStub(channel)
        tokens = js.DecodeRequest.TokenContent(token_ids=[5, 6, 7, 8, 9])
        requests = [js.DecodeRequest(max_tokens=12, text_content=js.DecodeRequest.TextContent(text="Hello world")),
                    js.DecodeRequest(max_tokens=12, token_content=tokens, num_samples=2)]
        for request, w in zip(requests, want):
            samples = max(request.num_samples, 1)
            text, ids = [""] * samples, [[] for _ in range(samples)]
            for response in stub.Decode(request, metadata=AUTH, timeout=60):
                assert response.WhichOneof("content") == "stream_content"
                assert len(response.stream_content.samples) == samples
                for k, sample in enumerate(response.stream_content.samples):
                    text[k] += sample.text
                    ids[k].extend(sample.token_ids)
            assert text == [w.outputs[0].text] * samples
            assert ids == [w.outputs[0].token_ids] * samples
        assert stub.HealthCheck(js.HealthCheckRequest(), metadata=AUTH).is_live
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Decode(js.DecodeRequest(max_tokens=4), metadata=AUTH))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "content" in e.value.details()


def aborted(engine) -> float:
    return engine.metrics.requests.labels(status="abort", model_name=engine.model_name)._value.get()


def test_cancel_10_of_40_streams(llm, engine, server):
    prompts = [PROMPTS[i % 4] if i % 5 else f"Stream {i} says" for i in range(40)]
    cancel = set(range(0, 40, 4))
    params = SamplingParams(max_tokens=24, **GREEDY)
    long = SamplingParams(max_tokens=400, **GREEDY)
    want = expected(llm, engine, prompts, params)
    aborted_before = aborted(engine)

    async def one(c, i):
        if i not in cancel:
            return await stream_collect(c, prompts[i], params)
        async with contextlib.aclosing(c.generate_stream(prompts[i], long)) as stream:
            n = 0
            async for _ in stream:
                n += 1
                if n == 3:
                    return None  # leaving the stream cancels the call

    async def main():
        async with AsyncClient(server.address, api_key=KEY, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(40)))

    got = asyncio.run(main())
    with Client(server.address, api_key=KEY) as c, contextlib.closing(c.generate_stream("Sync", long)) as s:
        next(s), next(s)  # the sync client cancels when its stream is closed early
    for i in range(40):
        if i not in cancel:
            assert summary(got[i]) == summary(want[i]), i
    stats = wait_engine_idle(engine)
    assert engine.num_in_flight == 0
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_pages"] == stats["num_total_pages"]
    assert aborted(engine) - aborted_before == len(cancel) + 1  # aborted, not run to max_tokens


def test_deadline_exceeded_frees_pages(engine, client, server):
    # 5 ms a step: 480 tokens take >= 2.4 s, so both deadlines below expire mid-request however
    # fast the device is.
    with faults.installed(engine.engine, faults.Faults(step_delay_s=0.005)):
        _deadline_exceeded_frees_pages(engine, client, server)


def _deadline_exceeded_frees_pages(engine, client, server):
    before = aborted(engine)
    params = SamplingParams(max_tokens=480, **GREEDY)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        client.generate("Hello", params, timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 10

    async def stream():
        got = 0
        async with AsyncClient(server.address, api_key=KEY) as c:
            with pytest.raises(grpc.RpcError) as e:
                async for _ in c.generate_stream([5, 6, 7], params, timeout=1.0):
                    got += 1
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return got

    assert asyncio.run(stream()) < 480
    stats = wait_engine_idle(engine)
    assert stats["num_free_pages"] == stats["num_total_pages"] and engine.num_in_flight == 0
    assert aborted(engine) - before == 2


# -- validation ------------------------------------------------------------------------

def _req(**sp):
    return pb.GenerateRequest(text="Hello", sampling_params=pb.SamplingParams(max_tokens=4, **sp))


def _field(name, values, build=None):
    return values.map(lambda v: (name, (build or (lambda x: _req(**{name: x})))(v)))


I32 = dict(min_value=-2**31, max_value=2**31 - 1)
NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])
BELOW = lambda x: st.floats(max_value=x, exclude_max=True, allow_nan=False)  # noqa: E731
ABOVE = lambda x: st.floats(min_value=x, exclude_min=True, allow_nan=False)  # noqa: E731
INVALID = st.one_of(
    _field("n", st.integers(-2**31, 0) | st.integers(17, 2**31 - 1)),  # max_num_seqs is 16
    _field("temperature", BELOW(0) | NONFINITE),
    _field("top_p", BELOW(0) | st.just(0.0) | ABOVE(1) | NONFINITE),
    _field("top_k", st.integers(-2**31, -2)),
    _field("min_p", BELOW(0) | ABOVE(1) | NONFINITE),
    _field("repetition_penalty", BELOW(0) | st.just(0.0) | NONFINITE),
    _field("presence_penalty", BELOW(-2) | ABOVE(2) | NONFINITE),
    _field("frequency_penalty", BELOW(-2) | ABOVE(2) | NONFINITE),
    _field("max_tokens", st.integers(-2**31, -1) | st.integers(511, 2**31 - 1),
           lambda v: pb.GenerateRequest(text="Hello", sampling_params=pb.SamplingParams(max_tokens=v))),
    _field("min_tokens", st.integers(-2**31, -1) | st.integers(5, 2**31 - 1)),
    _field("logprobs", st.integers(-2**31, -1) | st.integers(21, 2**31 - 1)),
    _field("stop", st.lists(st.text(min_size=1, max_size=3), max_size=3).map(lambda s: s + [""])),
    _field("stop_token_ids", st.integers(-2**31, -1) | st.integers(VOCAB, 2**31 - 1),
           lambda t: _req(stop_token_ids=[3, t])),
    _field("logit_bias", st.integers(-2**31, -1) | st.integers(VOCAB, 2**31 - 1),
           lambda t: _req(logit_bias={t: 1.0})),
    _field("logit_bias", BELOW(-100) | ABOVE(100) | NONFINITE, lambda b: _req(logit_bias={5: b})),
    _field("prompt", st.lists(st.integers(**I32), min_size=1, max_size=8).filter(
        lambda ids: any(not 0 <= t < VOCAB for t in ids)), lambda ids: pb.GenerateRequest(token_ids=ids)),
    _field("prompt", st.integers(512, 600), lambda n: pb.GenerateRequest(token_ids=[5] * n)),
    _field("prompt", st.just(None), lambda _: pb.GenerateRequest(sampling_params=pb.SamplingParams(max_tokens=2))),
    _field("prompt", st.text(min_size=1, max_size=5), lambda t: pb.GenerateRequest(text=t, token_ids=[1, 2])),
    _field("request_id", st.text(max_size=4).map(lambda t: f"{t}#{t}"),
           lambda rid: pb.GenerateRequest(request_id=rid, text="Hello")),
)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.GenerationServiceStub(channel)
    channel.close()


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=INVALID)
def test_invalid_requests_are_invalid_argument(stub, case):
    field, request = case
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request, metadata=AUTH, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert field in e.value.details()


def test_server_serves_after_invalid_requests(stub, client, engine):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GenerateStream(_req(temperature=-1.0), metadata=AUTH, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.details()
    assert client.health() == "SERVING"
    out = client.generate("Hello", SamplingParams(max_tokens=3, **GREEDY))
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"
    stats = wait_engine_idle(engine)
    assert stats["num_free_pages"] == stats["num_total_pages"]


# -- auth, health, reflection ----------------------------------------------------------

def test_api_key_required_on_every_rpc_but_health(server):
    with grpc.insecure_channel(server.address) as channel:
        gen, jet = pb_grpc.GenerationServiceStub(channel), js_grpc.OrchestratorStub(channel)
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        calls = [
            lambda md: gen.Generate(_req(), metadata=md),
            lambda md: list(gen.GenerateStream(_req(), metadata=md)),
            lambda md: gen.Tokenize(pb.TokenizeRequest(text="hi"), metadata=md),
            lambda md: gen.GetModelInfo(pb.GetModelInfoRequest(), metadata=md),
            lambda md: list(jet.Decode(js.DecodeRequest(max_tokens=2, text_content={"text": "hi"}), metadata=md)),
            lambda md: jet.HealthCheck(js.HealthCheckRequest(), metadata=md),
            lambda md: list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                      metadata=md)),
        ]
        for metadata in [(), (("authorization", "Bearer wrong-key"),), (("authorization", KEY),),
                         (("authorization", f"Basic {KEY}"),)]:
            for call in calls:
                with pytest.raises(grpc.RpcError) as e:
                    call(metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert gen.Tokenize(pb.TokenizeRequest(text="hi"), metadata=AUTH).token_ids


def test_health_and_reflection_answer_standard_clients(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "jaxserve.v1.GenerationService", "jetstream_proto.Orchestrator"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

        authed = grpc.intercept_channel(channel, BearerInterceptor(KEY))  # as `grpcurl -H 'authorization: ...'`
        db = ProtoReflectionDescriptorDatabase(authed)
        assert {"jaxserve.v1.GenerationService", "jetstream_proto.Orchestrator", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("jaxserve.v1.GenerationService")
        assert [m.name for m in service.methods] == ["Generate", "GenerateStream", "Tokenize", "GetModelInfo",
                                                     "LoadLoRAAdapter", "UnloadLoRAAdapter"]
        assert service.FindMethodByName("GenerateStream").server_streaming
        params = pool.FindMessageTypeByName("jaxserve.v1.SamplingParams")
        assert params.fields_by_name["temperature"].has_presence
        decode = pool.FindMessageTypeByName("jetstream_proto.DecodeRequest")
        assert {f.name: f.number for f in decode.fields} == {
            "max_tokens": 4, "text_content": 5, "token_content": 6, "metadata": 7, "num_samples": 8}


def test_tokenize_and_model_info(llm, client):
    tok = llm.get_tokenizer()
    assert client.tokenize("Hello world") == tok("Hello world")["input_ids"]
    assert client.tokenize("Hello world", add_special_tokens=False) == tok("Hello world", add_special_tokens=False)[
        "input_ids"]
    info = client.model_info()
    cfg = llm.engine.config
    assert (info.max_model_len, info.dtype, info.platform) == (512, "float32", "cpu")
    assert list(info.token_buckets) == list(cfg.token_buckets) and list(info.seq_buckets) == list(cfg.seq_buckets)
    assert dict(info.mesh) == {"data": 1, "model": 1} and info.vocab_size == VOCAB
    assert info.num_pages == llm.stats()["num_total_pages"]


# -- other servers over the same engine: cap, TLS, a dead engine -----------------------

def test_concurrency_cap_answers_resource_exhausted_at_once(loop, engine):
    capped = loop.start_frontend(engine, max_concurrent=2)
    long = SamplingParams(max_tokens=480, **GREEDY)

    async def main():
        async with AsyncClient(capped.address, timeout=60) as c:
            streams = [c.generate_stream(p, long) for p in ("Hello", "World")]
            for s in streams:
                await s.__anext__()  # both are in flight
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                await c.generate("One more", SamplingParams(max_tokens=2))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent" in e.value.details() and time.monotonic() - start < 5
            for s in streams:
                await s.aclose()
            for _ in range(100):
                if capped.admission.in_flight == 0:
                    break
                await asyncio.sleep(0.02)
            out = await c.generate("One more", SamplingParams(max_tokens=2, **GREEDY))
            assert len(out.outputs[0].token_ids) == 2

    try:
        asyncio.run(main())
    finally:
        loop.run(capped.stop(0))
    stats = wait_engine_idle(engine)
    assert stats["num_free_pages"] == stats["num_total_pages"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(loop, engine, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    secure = loop.start_frontend(engine, tls_cert=str(cert), tls_key=str(key))
    try:
        with Client(secure.address, root_certificates=cert, timeout=30) as c:
            assert c.health() == "SERVING"
            assert len(c.generate("Hello", SamplingParams(max_tokens=2, **GREEDY)).outputs[0].token_ids) == 2
        with Client(secure.address, timeout=5) as plain, pytest.raises(grpc.RpcError) as e:
            plain.tokenize("Hello")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.run(secure.stop(0))


def test_engine_failure_is_internal_and_not_serving(llm, loop):
    dying = AsyncLLM(engine=FailingEngine(llm.engine))
    frontend = loop.start_frontend(dying)
    try:
        with Client(frontend.address, timeout=30) as c:
            assert c.health() == "SERVING"
            with pytest.raises(grpc.RpcError) as e:
                c.generate("Hello", SamplingParams(max_tokens=3))
            assert e.value.code() == grpc.StatusCode.INTERNAL and "device lost" in e.value.details()
            deadline = time.monotonic() + 5
            while c.health() != "NOT_SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.health() == "NOT_SERVING"
            assert c.health("jaxserve.v1.GenerationService") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate_stream("Hello", SamplingParams(max_tokens=3)))
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert not js_grpc.OrchestratorStub(c.channel).HealthCheck(js.HealthCheckRequest()).is_live
    finally:
        loop.run(frontend.stop(0))
        dying.shutdown()


def test_committed_stubs_are_up_to_date():
    pytest.importorskip("grpc_tools")
    from jaxserve.protos import generate

    assert generate.main(["--check"]) == 0, "run: python -m jaxserve.protos.generate"


def test_run_serves_a_list_of_frontends_and_drains(loop, engine):
    from jaxserve.entrypoints.grpc.server import GrpcFrontend
    from jaxserve.entrypoints.server import run

    class Recorder:  # a front end without set_serving (as an HTTP one may be)
        def __init__(self):
            self.calls = []

        async def start(self):
            self.calls.append("start")

        async def stop(self, grace):
            self.calls.append(("stop", grace))

    grpc_frontend, other = GrpcFrontend(engine, port=0), Recorder()
    stop = loop.run(_make_event())
    done = asyncio.run_coroutine_threadsafe(run(engine, [grpc_frontend, other], grace=5.0, stop=stop,
                                                handle_signals=False), loop.loop)
    deadline = time.monotonic() + 30
    while grpc_frontend.port is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with Client(grpc_frontend.address) as c:
        c.wait_until_serving(30)
        assert c.health("jetstream_proto.Orchestrator") == "SERVING"
        loop.loop.call_soon_threadsafe(stop.set)
        assert done.result(30) == 0
    assert other.calls == ["start", ("stop", 5.0)]
    assert grpc_frontend.admission.draining


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


def test_bench_cli_measures_a_running_server(engine, server, tmp_path, capsys, monkeypatch):
    """`jaxserve bench` drives the real server and reports what it served."""
    import json

    from jaxserve.entrypoints.cli import main as cli_main

    monkeypatch.setenv("JAXSERVE_API_KEY", KEY)
    generated_before = engine.metrics.generation_tokens._value.get()
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--server", f"127.0.0.1:{server.port}", "--num-requests", "6", "--prompt-len", "3-20",
                     "--output-len", "2-6", "--max-concurrency", "4", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["requests"] == 6
    assert summary["output_tokens"] == engine.metrics.generation_tokens._value.get() - generated_before
    assert 12 <= summary["output_tokens"] <= 36 and summary["ttft_p50_ms"] > 0
    assert "| TTFT |" in capsys.readouterr().out
    wait_engine_idle(engine)
