"""`jaxserve serve` as a real process: SERVING after warm-up (via grpc.health.v1), `generate
--server` against it, and SIGTERM under load: in-flight streams finish, new calls are
refused, the process exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from engine_fixtures import write_engine_test_model
from jaxserve import SamplingParams
from jaxserve.entrypoints.cli import main as cli_main
from jaxserve.entrypoints.client import Client
from jaxserve.outputs import merge_delta

ROOT = Path(__file__).parents[3]
STARTUP_TIMEOUT_S = 240


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, JAXSERVE_CACHE_DIR=str(tmp / "cache"), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # The suite's persistent XLA cache (tests/conftest.py): the server skips compiling.
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "jaxserve-tests-xla-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


class ServeProcess:
    """`python -m jaxserve.entrypoints.cli serve ...` with its log read on a thread (to learn the port)."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "jaxserve.entrypoints.cli", "serve", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.port: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            found = re.search(r"gRPC listening on [\d.]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))

    def wait_for_port(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while self.port is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the server did not start:\n" + "".join(self.lines[-40:]))
            time.sleep(0.1)
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    write_engine_test_model(tmp / "model")
    server = ServeProcess([str(tmp / "model"), "--config", "configs/cpu.yaml", "--grpc-port", "0",
                           "--http-port", "0", "--grace-period", "60"], _env(tmp))
    try:
        address = server.wait_for_port(STARTUP_TIMEOUT_S)
        with Client(address, timeout=60) as client:
            client.wait_until_serving(STARTUP_TIMEOUT_S)
        yield server, address
    finally:
        server.kill()


def test_generate_with_server_flag(served, capsys):
    _, address = served
    assert cli_main(["generate", "--server", address, "--prompt", "Hello world", "--max-tokens", "6"]) == 0
    with Client(address) as client:
        want = client.generate("Hello world", SamplingParams(max_tokens=6, temperature=0.0)).outputs[0].text
    assert capsys.readouterr().out == f"--- prompt: 'Hello world'\n{want}\n"


def test_http_and_grpc_share_one_engine(served):
    import re

    import httpx

    server, address = served
    ports = [m.group(1) for line in server.lines if (m := re.search(r"HTTP API on http://[\d.]+:(\d+)/v1", line))]
    assert ports, "".join(server.lines[-20:])
    body = {"model": "ignored-by-check", "prompt": "Hello world", "max_tokens": 6, "temperature": 0.0}
    models = httpx.get(f"http://127.0.0.1:{ports[0]}/v1/models", timeout=30).json()
    body["model"] = models["data"][0]["id"]
    http_text = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/completions", json=body, timeout=60).json()
    with Client(address) as client:
        grpc_text = client.generate("Hello world", SamplingParams(max_tokens=6, temperature=0.0)).outputs[0].text
    assert http_text["choices"][0]["text"] == grpc_text


def test_sigterm_drains_in_flight_streams_and_exits_0(served):
    server, address = served
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    results: dict[int, object] = {}
    started = threading.Barrier(5)

    def stream(i: int) -> None:
        with Client(address, timeout=120) as client:
            acc, first = None, True
            try:
                for delta in client.generate_stream(f"Request {i} of the drain test", params):
                    acc = merge_delta(acc, delta)
                    if first:
                        first = False
                        started.wait(60)
                results[i] = acc
            except grpc.RpcError as e:
                results[i] = e

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(60)  # every stream has its first token
    server.proc.send_signal(signal.SIGTERM)
    with Client(address, timeout=10) as client:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if client.health(timeout=2) == "NOT_SERVING":
                    break
            except grpc.RpcError:
                break
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as e:
            client.generate("too late", SamplingParams(max_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(120)
    assert server.proc.wait(60) == 0, "".join(server.lines[-30:])
    for i in range(4):
        out = results[i]
        assert not isinstance(out, grpc.RpcError), out
        assert len(out.outputs[0].token_ids) == 300 and out.outputs[0].finish_reason == "length"
    log = "".join(server.lines)
    assert "received SIGTERM" in log and "draining: 4 requests in flight" in log and "stopped" in log
