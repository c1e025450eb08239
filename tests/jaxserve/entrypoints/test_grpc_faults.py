"""A failure traced to one request answers that gRPC call with INTERNAL (not UNKNOWN) and the
server keeps serving everyone else."""

from __future__ import annotations

import grpc
import pytest

from grpc_fixtures import wait_engine_idle
from jaxserve import SamplingParams
from jaxserve.engine import faults
from jaxserve.entrypoints.client import Client

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(engine, loop):
    frontend = loop.start_frontend(engine)
    yield engine, frontend
    loop.run(frontend.stop(0))


def test_traced_request_failure_is_internal_for_that_call_only(served):
    engine, frontend = served
    with Client(frontend.address, timeout=60) as client:
        before = client.generate("Hello there", GREEDY).outputs[0].token_ids
        with faults.installed(engine.engine, faults.Faults(request_marker="BOOM")):
            with pytest.raises(grpc.RpcError) as err:
                client.generate("BOOM goes this one", GREEDY)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "failed" in err.value.details()
            assert client.generate("Hello there", GREEDY).outputs[0].token_ids == before
    assert engine.healthy
    stats = wait_engine_idle(engine)
    assert stats["num_free_pages"] == stats["num_total_pages"] or engine.engine.config.enable_prefix_caching
