"""LoRA adapters over HTTP and gRPC (issue 18): the official `openai` client with model="adapter",
/v1/models listing adapters with their base as parent, /v1/load_lora_adapter and
/v1/unload_lora_adapter with and without the API key (unloading refused while a request of the
adapter runs), GenerateRequest.lora_name and the gRPC load / unload calls."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest

pytest.importorskip("peft")

from engine_fixtures import write_engine_test_model  # noqa: E402
from grpc_fixtures import BearerInterceptor, LoopThread  # noqa: E402
from http_helpers import CPU, MODEL, ServerThread, base_url  # noqa: E402
from lora_fixtures import ADAPTERS, write_adapter  # noqa: E402
from jaxserve import AsyncLLM, LLM, LoRARequest, SamplingParams  # noqa: E402
from jaxserve.entrypoints.client import Client  # noqa: E402
from jaxserve.entrypoints.lora_modules import parse_lora_modules, preload  # noqa: E402
from jaxserve.protos.v1 import generate_pb2 as pb  # noqa: E402
from jaxserve.protos.v1 import generate_pb2_grpc as pb_grpc  # noqa: E402

KEY = "lora-key"
PROMPT = "The capital of France is"
GREEDY = dict(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-serving")
    write_engine_test_model(root / "base")
    paths = {}
    for seed, name in enumerate(("alpha", "beta"), start=1):
        r, targets, rslora = ADAPTERS[name]
        write_adapter(root / "base", root / name, r, targets, rslora, seed)
        paths[name] = str(root / name)
    llm = LLM(str(root / "base"), config=CPU, enable_lora=True, max_loras=2, max_lora_rank=16)
    # the oracle: LLM.generate with the ids the server gives (alpha preloaded: 1, beta loaded later: 2)
    want = {name: llm.generate([PROMPT], SamplingParams(**GREEDY), use_tqdm=False,
                               lora_request=None if name is None else LoRARequest(name, i, paths[name]))[0]
            .outputs[0].text for i, name in ((0, None), (1, "alpha"), (2, "beta"))}
    assert len(set(want.values())) == 3  # the adapters change the text: every check below can fail
    llm.engine.remove_lora(2)  # the server loads beta itself
    engine = AsyncLLM(engine=llm.engine, model_name=MODEL)
    st = ServerThread()
    st.run(preload(engine, parse_lora_modules([f"alpha={paths['alpha']}"])))
    frontend = st.serve(engine, api_key=KEY)
    yield engine, st, frontend, paths, want
    st.close()
    engine.shutdown()


def test_openai_client_names_adapters(setup):
    _, _, frontend, _, want = setup
    client = openai.OpenAI(base_url=base_url(frontend) + "/v1", api_key=KEY, max_retries=0)
    extra = {"extra_body": {"ignore_eos": True}}
    for model, expect in ((MODEL, want[None]), ("alpha", want["alpha"])):
        got = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0.0, **extra)
        assert got.choices[0].text == expect and got.model == model, model  # the response names what was asked
        stream = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0.0,
                                                stream=True, **extra))
        assert "".join(c.choices[0].text for c in stream) == expect, model
        assert {c.model for c in stream} == {model}
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].message.content is not None and chat.model == "alpha"
    with pytest.raises(openai.NotFoundError, match="no-such-adapter"):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL, "alpha"}
    assert cards["alpha"].parent == MODEL and cards["alpha"].root == setup[3]["alpha"]
    assert client.models.retrieve("alpha").id == "alpha"


def test_load_and_unload_over_http(setup):
    _, _, frontend, paths, want = setup
    url = base_url(frontend)
    auth = {"Authorization": f"Bearer {KEY}"}
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    with httpx.Client(base_url=url, timeout=60) as http:
        body = {"lora_name": "beta", "lora_path": paths["beta"]}
        assert http.post("/v1/load_lora_adapter", json=body).status_code == 401
        assert "beta" not in {m.id for m in client.models.list().data}
        r = http.post("/v1/load_lora_adapter", json=body, headers=auth)
        assert r.status_code == 200 and "beta" in r.text
        got = client.completions.create(model="beta", prompt=PROMPT, max_tokens=10, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == want["beta"]
        r = http.post("/v1/load_lora_adapter", json=body, headers=auth)
        assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": paths["beta"] + "-x"},
                      headers=auth)
        assert r.status_code == 400 and "gone" in r.json()["error"]["message"]
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "x"}, headers=auth).status_code == 400
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "beta"}).status_code == 401
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "beta"}, headers=auth)
        assert r.status_code == 200 and "removed" in r.text
        with pytest.raises(openai.NotFoundError, match="beta"):
            client.completions.create(model="beta", prompt=PROMPT, max_tokens=2)
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "beta"}, headers=auth)
        assert r.status_code == 404 and "beta" in r.json()["error"]["message"]


def test_unload_with_a_request_in_flight_is_refused(setup):
    _, _, frontend, _, want = setup
    url = base_url(frontend)
    auth = {"Authorization": f"Bearer {KEY}"}
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    stream = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=400, temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks).choices[0].text
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}, headers=auth)
        assert r.status_code == 409 and "unfinished" in r.json()["error"]["message"]
        text = first + "".join(c.choices[0].text for c in chunks)
        assert text.startswith(want["alpha"])  # its tokens are still alpha's, all the way
        assert "alpha" in {m.id for m in client.models.list().data}


def test_grpc_lora_name_and_load_unload(setup):
    engine, _, _, paths, want = setup
    loop = LoopThread()
    frontend = loop.start_frontend(engine, api_key=KEY)
    try:
        with grpc.insecure_channel(frontend.address) as channel:
            stub = pb_grpc.GenerationServiceStub(grpc.intercept_channel(channel, BearerInterceptor(KEY)))
            params = pb.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
            got = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling_params=params, lora_name="alpha"))
            assert got.completions[0].text == want["alpha"]
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(pb.GenerateRequest(text=PROMPT, sampling_params=params, lora_name="nope"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in e.value.details()
            stub.LoadLoRAAdapter(pb.LoadLoRAAdapterRequest(lora_name="beta2", lora_path=paths["beta"]))
            got = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling_params=params, lora_name="beta2"))
            assert got.completions[0].text == want["beta"]
            with pytest.raises(grpc.RpcError) as e:
                stub.LoadLoRAAdapter(pb.LoadLoRAAdapterRequest(lora_name="bad", lora_path="/no/such/adapter"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stub.UnloadLoRAAdapter(pb.UnloadLoRAAdapterRequest(lora_name="beta2"))
            with pytest.raises(grpc.RpcError) as e:
                stub.UnloadLoRAAdapter(pb.UnloadLoRAAdapterRequest(lora_name="beta2"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with Client(frontend.address, api_key=KEY) as client:  # the Python client's lora_name
                assert client.generate(PROMPT, SamplingParams(**GREEDY), lora_name="alpha").outputs[0].text == \
                    want["alpha"]
                assert client.generate(PROMPT, SamplingParams(**GREEDY)).outputs[0].text == want[None]
            no_key = pb_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                no_key.LoadLoRAAdapter(pb.LoadLoRAAdapterRequest(lora_name="x", lora_path=paths["beta"]))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        loop.run(frontend.stop(1.0))
        loop.close()


def test_parse_lora_modules():
    assert parse_lora_modules(["a=/x", '{"name": "b", "path": "/y"}']) == {"a": "/x", "b": "/y"}
    for bad in (["a"], ["=x"], ["a=/x", "a=/y"], ['{"name": "b"}']):
        with pytest.raises(ValueError, match="--lora-modules"):
            parse_lora_modules(bad)
