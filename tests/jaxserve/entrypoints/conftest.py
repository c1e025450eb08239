"""Module-scoped fixtures the gRPC-facing tests share: an AsyncLLM over the tiny test model
on the CPU preset, and an event-loop thread to run front ends on. A module that needs
something else (a model name, another config) defines its own `engine` or `loop`."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_fixtures import write_engine_test_model
from grpc_fixtures import LoopThread
from jaxserve import LLM, AsyncLLM

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("entrypoints-model")
    write_engine_test_model(path)
    a = AsyncLLM(engine=LLM(str(path), config=CPU).engine)
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()
