"""Bad values over gRPC, generated from a table of SamplingParams fields x out-of-range and
wrong numbers (int32 extremes, -1, -2, NaN, +-inf, 1e39, vocabulary-sized token ids, too many
logit_bias entries, empty / double prompts, a request_id already in flight) on Generate,
GenerateStream and JetStream's Decode against the real engine: every answer is
INVALID_ARGUMENT naming the field (never UNKNOWN or INTERNAL), nothing is logged as an ERROR,
and afterwards the same greedy request gives the same tokens and all pages are free.

The proto types bound what can be sent at all: an int32 field cannot carry 2^31 (the Python
protobuf refuses it, and on the wire it would parse as -2^31, which the table covers); seed is
an int64 and every int64 is a valid seed (both extremes are sent and must be accepted)."""

from __future__ import annotations

import logging

import grpc
import pytest

from engine_fixtures import VOCAB
from grpc_fixtures import wait_engine_idle
from jaxserve import SamplingParams
from jaxserve.entrypoints.client import Client
from jaxserve.protos import jetstream_pb2 as js
from jaxserve.protos.v1 import generate_pb2 as pb
from jaxserve.worker.input_batch import MAX_BIAS_ENTRIES

KEY = "test-key-bad-values-0123"
AUTH = (("authorization", f"Bearer {KEY}"),)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

GEN = "/jaxserve.v1.GenerationService/"
JET = "/jetstream_proto.Orchestrator/"

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
NAN, INF = float("nan"), float("inf")

INTS = {"-1": -1, "-2": -2, "-2^31": I32_MIN, "2^31-1": I32_MAX}
FLOATS = {"NaN": NAN, "inf": INF, "-inf": -INF, "1e39": 1e39, "-1e39": -1e39, "-1": -1.0, "-2": -2.0,
          "1.5": 1.5, "-3": -3.0, "2^31": 2.0**31, "1e308": 1e308}

# field -> the labels that are VALID for it (left out of the table)
INT_FIELDS = {
    "n": set(),
    "top_k": {"-1"},
    "max_tokens": set(),
    "min_tokens": set(),
    "logprobs": set(),
}
FLOAT_FIELDS = {
    "temperature": {"1.5", "2^31"},
    "top_p": set(),
    "min_p": set(),
    "repetition_penalty": {"1.5", "2^31"},
    "presence_penalty": {"-1", "-2", "1.5"},
    "frequency_penalty": {"-1", "-2", "1.5"},
}


def _request(prompt="Hello world, a prompt", request_id="", **params) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id=request_id, sampling_params=pb.SamplingParams(max_tokens=4, temperature=0.0))
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.extend(prompt)
    for name, value in params.items():
        if name in ("stop", "stop_token_ids"):
            getattr(msg.sampling_params, name).extend(value)
        elif name == "logit_bias":
            for k, v in value.items():
                msg.sampling_params.logit_bias[k] = v
        else:
            setattr(msg.sampling_params, name, value)
    return msg


def _generate_cases() -> list[tuple[str, pb.GenerateRequest, str]]:
    """(label, request, what the error's details must contain: the field)."""
    cases = []
    for field, valid in INT_FIELDS.items():
        for label, value in INTS.items():
            if label not in valid:
                cases.append((f"{field}={label}", _request(**{field: value}), field))
    for field, valid in FLOAT_FIELDS.items():
        for label, value in FLOATS.items():
            if label not in valid:
                cases.append((f"{field}={label}", _request(**{field: value}), field))
    for label, value in {"-1": -1, "-2^31": I32_MIN, "vocab": VOCAB, "2^31-1": I32_MAX}.items():
        cases.append((f"stop_token_ids[0]={label}", _request(stop_token_ids=[value]), "stop_token_ids"))
        cases.append((f"logit_bias key={label}", _request(logit_bias={value: 1.0}), "logit_bias key"))
        cases.append((f"token_ids[0]={label}", _request(prompt=[1, 2, value]), "prompt"))
    for label, value in {"NaN": NAN, "inf": INF, "-inf": -INF, "101": 101.0, "-101": -101.0,
                         "1e39": 1e39}.items():
        cases.append((f"logit_bias value={label}", _request(logit_bias={5: value}), "logit_bias value"))
    cases += [
        ("logit_bias too many", _request(logit_bias={t: 1.0 for t in range(MAX_BIAS_ENTRIES + 1)}), "logit_bias"),
        ("logit_bias too many with min_tokens",
         _request(min_tokens=2, logit_bias={t: 1.0 for t in range(MAX_BIAS_ENTRIES)}), "logit_bias"),
        ("stop empty string", _request(stop=[""]), "stop"),
        ("stop empty string among many", _request(stop=["a"] * 50 + [""]), "stop"),
        ("empty prompt", _request(prompt=""), "prompt"),
        ("text and token_ids", _request(prompt=[1, 2, 3]).__class__(
            text="Hello", token_ids=[1, 2, 3], sampling_params=pb.SamplingParams(max_tokens=4)), "prompt"),
        ("prompt too long (tokens)", _request(prompt=[1] * 512), "prompt"),
        ("prompt too long (text)", _request(prompt="x" * 100_000), "prompt"),
        ("max_tokens past the context", _request(max_tokens=510, prompt=[1, 2, 3, 4, 5]), "max_tokens"),
        ("min_tokens > max_tokens", _request(min_tokens=5, max_tokens=4), "min_tokens"),
        ("n > max_num_seqs", _request(n=17), "n must"),
        ("request_id with '#'", _request(request_id="a#b"), "request_id"),
    ]
    return cases


def _decode_cases() -> list[tuple[str, js.DecodeRequest, str]]:
    text = {"text": "Hello world"}
    cases = []
    for label, value in INTS.items():
        cases.append((f"max_tokens={label}", js.DecodeRequest(max_tokens=value, text_content=text), "max_tokens"))
        cases.append((f"num_samples={label}", js.DecodeRequest(max_tokens=3, num_samples=value, text_content=text),
                      "num_samples" if value < 0 else "n must"))
    for label, value in {"-1": -1, "-2^31": I32_MIN, "vocab": VOCAB, "2^31-1": I32_MAX}.items():
        cases.append((f"token_ids[0]={label}",
                      js.DecodeRequest(max_tokens=3, token_content={"token_ids": [1, value]}), "prompt"))
    cases += [
        ("no content", js.DecodeRequest(max_tokens=3), "content"),
        ("empty text", js.DecodeRequest(max_tokens=3, text_content={"text": ""}), "prompt"),
        ("empty token ids", js.DecodeRequest(max_tokens=3, token_content={"token_ids": []}), "prompt"),
        ("prompt too long", js.DecodeRequest(max_tokens=3, token_content={"token_ids": [1] * 512}), "prompt"),
    ]
    return cases


GENERATE_CASES = _generate_cases()
DECODE_CASES = _decode_cases()


@pytest.fixture(scope="module")
def server(loop, engine):
    frontend = loop.start_frontend(engine, api_key=KEY)
    yield frontend
    loop.run(frontend.stop(0))


def _stubs(channel):
    ser = lambda m: m.SerializeToString()  # noqa: E731
    return {
        "Generate": channel.unary_unary(GEN + "Generate", request_serializer=ser,
                                        response_deserializer=pb.GenerateResponse.FromString),
        "GenerateStream": channel.unary_stream(GEN + "GenerateStream", request_serializer=ser,
                                               response_deserializer=pb.GenerateStreamResponse.FromString),
        "Decode": channel.unary_stream(JET + "Decode", request_serializer=ser,
                                       response_deserializer=js.DecodeResponse.FromString),
    }


def _refused(stub, unary: bool, request) -> grpc.RpcError:
    try:
        if unary:
            stub(request, metadata=AUTH, timeout=30)
        else:
            list(stub(request, metadata=AUTH, timeout=30))
    except grpc.RpcError as e:
        return e
    raise AssertionError("the request was accepted")


def test_bad_values_are_invalid_argument_naming_the_field(server, engine, caplog):
    with Client(server.address, api_key=KEY, timeout=60) as client:
        before = client.generate("Hello", GREEDY).outputs[0].token_ids
    wait_engine_idle(engine)
    caplog.set_level(logging.INFO)
    n, wrong = 0, []
    with grpc.insecure_channel(server.address) as channel:
        stubs = _stubs(channel)
        for method in ("Generate", "GenerateStream"):
            for label, request, field in GENERATE_CASES:
                try:
                    err = _refused(stubs[method], method == "Generate", request)
                except AssertionError:
                    wrong.append((method, label, "accepted"))
                    continue
                n += 1
                if err.code() != grpc.StatusCode.INVALID_ARGUMENT or field not in err.details():
                    wrong.append((method, label, err.code(), err.details()))
        for label, request, field in DECODE_CASES:
            try:
                err = _refused(stubs["Decode"], False, request)
            except AssertionError:
                wrong.append(("Decode", label, "accepted"))
                continue
            n += 1
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT or field not in err.details():
                wrong.append(("Decode", label, err.code(), err.details()))
    assert not wrong, "\n".join(map(repr, wrong))
    assert n >= 100, n
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]

    with Client(server.address, api_key=KEY, timeout=60) as client:
        assert client.health() == "SERVING"
        assert client.generate("Hello", GREEDY).outputs[0].token_ids == before
    stats = wait_engine_idle(engine)
    assert stats["num_free_pages"] == stats["num_total_pages"]


@pytest.mark.parametrize("seed", [I64_MIN, I64_MAX, -1, 0])
def test_int64_seed_extremes_are_accepted(server, engine, seed):
    """Every int64 is a valid seed: the extremes sample (twice alike), they are not refused."""
    with grpc.insecure_channel(server.address) as channel:
        stub = _stubs(channel)["Generate"]
        request = _request(seed=seed, temperature=1.0, max_tokens=6)
        request.sampling_params.ignore_eos = True
        first = stub(request, metadata=AUTH, timeout=60)
        second = stub(request, metadata=AUTH, timeout=60)
    assert len(first.completions[0].token_ids) == 6
    assert list(first.completions[0].token_ids) == list(second.completions[0].token_ids)
    wait_engine_idle(engine)


def test_request_id_in_flight_is_invalid_argument(server, engine):
    """A request_id already in flight: the second call is INVALID_ARGUMENT naming request_id,
    the first goes on; with both done the pages are free."""
    with grpc.insecure_channel(server.address) as channel:
        stubs = _stubs(channel)
        first = _request(request_id="dup-1", max_tokens=300)
        first.sampling_params.ignore_eos = True
        stream = stubs["GenerateStream"](first, metadata=AUTH, timeout=120)
        next(stream)  # the first is running
        for method in ("Generate", "GenerateStream"):
            err = _refused(stubs[method], method == "Generate", _request(request_id="dup-1"))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.code(), err.details())
            assert "request_id" in err.details() and "dup-1" in err.details()
        rest = list(stream)
        assert rest and rest[-1].finished
        assert sum(len(r.delta.token_ids) for r in rest) > 0
    stats = wait_engine_idle(engine)
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_table_size():
    assert 2 * len(GENERATE_CASES) + len(DECODE_CASES) >= 100
