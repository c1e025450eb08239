"""Malformed protobuf bytes on every gRPC method of both services (jaxserve.v1 and JetStream),
sent as raw bytes: with a valid key the answer is INVALID_ARGUMENT "malformed request: ...",
without one UNAUTHENTICATED (the key is checked before the bytes are parsed); nothing is
logged as an ERROR or with a traceback, refusals are rate-limited, and the engine serves the
same greedy tokens afterwards."""

from __future__ import annotations

import logging
import random

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from grpc_fixtures import wait_engine_idle
from jaxserve import SamplingParams
from jaxserve.entrypoints.client import Client
from jaxserve.entrypoints.grpc import common
from jaxserve.protos import jetstream_pb2 as js
from jaxserve.protos.v1 import generate_pb2 as pb

KEY = "test-key-malformed-0123"
AUTH = (("authorization", f"Bearer {KEY}"),)
NO_KEYS = [(), (("authorization", "Bearer wrong-key"),)]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

GEN = "/jaxserve.v1.GenerationService/"
JET = "/jetstream_proto.Orchestrator/"


@pytest.fixture(scope="module")
def server(loop, engine):
    frontend = loop.start_frontend(engine, api_key=KEY)
    yield frontend
    loop.run(frontend.stop(0))


@pytest.fixture
def fresh_log(monkeypatch):
    """A rate limiter of its own per test (the module's is shared with earlier tests)."""
    limiter = common.RateLimitedLog(common.log, interval_s=60.0)
    monkeypatch.setattr(common, "refusals", limiter)
    return limiter


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _truncations(message, cls, count: int = 3) -> list[bytes]:
    """Prefixes of message's bytes that do not parse (a cut at a field boundary would)."""
    data = message.SerializeToString()
    bad = []
    for cut in range(1, len(data)):
        try:
            cls.FromString(data[:cut])
        except Exception:  # noqa: BLE001
            bad.append(data[:cut])
    assert bad, f"no truncation of {cls.__name__} fails to parse"
    step = max(1, len(bad) // count)
    return bad[::step][:count]


def _garbage(seed: int, count: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    out = [b"\xff" * 12, b"\x07\x00\x00"]  # a run of continuation bytes; wire type 7 (invalid)
    while len(out) < count + 2:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(4, 64)))
        out.append(b"\xff" + data)  # 0xff...: a varint tag that never ends or an invalid one
    return out


BAD_UTF8 = b"hi \xff\xfe \xc3\x28 there"
HUGE_LEN = _varint(2 ** 62)  # a length far beyond the message


def _payloads(valid, cls, string_field: bytes | None) -> list[tuple[str, bytes]]:
    """(kind, bytes) that must not parse as cls. string_field: how a string with bad UTF-8
    is encoded (a function of the raw bytes) for the prompt of this method."""
    cases = [("garbage", g) for g in _garbage(len(cls.__name__))]
    if valid is not None and valid.ByteSize() > 1:
        cases += [("truncated", t) for t in _truncations(valid, cls)]
    if string_field is not None:
        cases.append(("bad utf-8", string_field))
        cases.append(("huge length", string_field[:1] + HUGE_LEN + b"abc"))
    else:
        cases.append(("huge length", _varint(1 << 3 | 2) + HUGE_LEN + b"abc"))
    cases.append(("overlong varint", b"\x08" + b"\xff" * 11))
    for kind, data in cases:
        with pytest.raises(Exception):
            cls.FromString(data)
    return cases


def _generate_request():
    return pb.GenerateRequest(request_id="r1", text="Hello world, a prompt",
                              sampling_params=pb.SamplingParams(max_tokens=4, temperature=0.0))


# (method, unary?, request type, a valid request, its prompt with bad UTF-8)
METHODS = [
    (GEN + "Generate", True, pb.GenerateRequest, _generate_request(), _ld(2, BAD_UTF8)),
    (GEN + "GenerateStream", False, pb.GenerateRequest, _generate_request(), _ld(1, BAD_UTF8) + _ld(2, b"ok")),
    (GEN + "Tokenize", True, pb.TokenizeRequest, pb.TokenizeRequest(text="Hello world", add_special_tokens=True),
     _ld(1, BAD_UTF8)),
    (GEN + "GetModelInfo", True, pb.GetModelInfoRequest, None, None),
    (JET + "Decode", False, js.DecodeRequest, js.DecodeRequest(max_tokens=3, text_content={"text": "Hello world"}),
     _ld(5, _ld(1, BAD_UTF8))),
    (JET + "HealthCheck", True, js.HealthCheckRequest, None, None),
]


def _call(channel, method: str, unary: bool, data: bytes, metadata):
    """Sends data as the request's bytes; returns the RpcError the call must end with."""
    if unary:
        stub = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        run = lambda: stub(data, metadata=metadata, timeout=10)  # noqa: E731
    else:
        stub = channel.unary_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        run = lambda: list(stub(data, metadata=metadata, timeout=10))  # noqa: E731
    with pytest.raises(grpc.RpcError) as e:
        run()
    return e.value


def _assert_quiet(caplog, max_warnings: int = 2) -> None:
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], "a record with a traceback"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= max_warnings, [r.getMessage() for r in warnings]


def test_malformed_bytes_on_every_method_invalid_argument_or_unauthenticated(server, engine, fresh_log, caplog):
    with Client(server.address, api_key=KEY, timeout=60) as client:
        before = client.generate("Hello", GREEDY).outputs[0].token_ids
    wait_engine_idle(engine)
    caplog.set_level(logging.INFO)
    n = 0
    with grpc.insecure_channel(server.address) as channel:
        for method, unary, cls, valid, bad_utf8 in METHODS:
            for kind, data in _payloads(valid, cls, bad_utf8):
                err = _call(channel, method, unary, data, AUTH)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, kind, err.code(), err.details())
                assert err.details().startswith("malformed request: ") and cls.DESCRIPTOR.full_name in err.details()
                assert len(err.details()) < 300
                for metadata in NO_KEYS:  # the key is checked before the bytes are parsed
                    err = _call(channel, method, unary, data, metadata)
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (method, kind, metadata, err.details())
                    assert "malformed" not in err.details()
                n += 3
        # health answers without a key: malformed bytes there are INVALID_ARGUMENT, not UNKNOWN
        for data in _garbage(1):
            for metadata in ((), AUTH):
                err = _call(channel, "/grpc.health.v1.Health/Check", True, data, metadata)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
                n += 1
        # a request stream (reflection): the malformed message ends the call with INVALID_ARGUMENT
        refl = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                     request_serializer=lambda b: b, response_deserializer=lambda b: b)
        good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        with pytest.raises(grpc.RpcError) as e:
            list(refl(iter([good, b"\xff" * 12]), metadata=AUTH, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            list(refl(iter([b"\xff" * 12]), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        n += 2
    assert n >= 100, n
    _assert_quiet(caplog)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("malformed" in m for m in messages) and any("API key" in m for m in messages), messages

    with Client(server.address, api_key=KEY, timeout=60) as client:
        assert client.health() == "SERVING"
        assert client.generate("Hello", GREEDY).outputs[0].token_ids == before
        # well-formed requests still pass the guarded deserializers
        assert client.tokenize("Hello world")
        assert client.model_info().max_model_len == 512
    stats = wait_engine_idle(engine)
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_malformed_without_api_key_configured_is_invalid_argument(loop, engine, fresh_log, caplog):
    open_server = loop.start_frontend(engine)
    caplog.set_level(logging.INFO)
    try:
        with grpc.insecure_channel(open_server.address) as channel:
            for method, unary, cls, valid, bad_utf8 in METHODS:
                for kind, data in _payloads(valid, cls, bad_utf8)[:4]:
                    err = _call(channel, method, unary, data, ())
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, kind, err.details())
                    assert err.details().startswith("malformed request: ")
            health = channel.unary_unary("/grpc.health.v1.Health/Check")
            ok = health(health_pb2.HealthCheckRequest().SerializeToString(), timeout=10)
            assert health_pb2.HealthCheckResponse.FromString(ok).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        loop.run(open_server.stop(0))
    _assert_quiet(caplog, max_warnings=1)


def test_rate_limited_log_counts_what_it_suppressed(caplog):
    now = [100.0]
    logger = logging.getLogger("test_grpc_malformed.ratelimit")
    limiter = common.RateLimitedLog(logger, interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger=logger.name)
    assert limiter.warning("a", "refused %s", "x")
    assert not any(limiter.warning("a", "refused %s", "y") for _ in range(5))
    assert limiter.warning("b", "other kind")  # kinds are limited separately
    now[0] += 10.5
    assert limiter.warning("a", "refused %s", "z")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "refused x" and messages[1] == "other kind"
    assert messages[2].startswith("refused z (5 more suppressed in the last ")
    assert len(messages) == 3
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in caplog.records)
