"""`jaxserve bench` fits its workload to the server and counts refusals (issue 13, item 8/9):
with its DEFAULT length settings (prompt 32-512 + output 32-256 tokens) against a real gRPC
server over the CPU preset (max_model_len 512, as `make serve`) it completes and prints its
table; a refused or failed request is counted in the table, never fatal."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import grpc
import pytest

from grpc_fixtures import wait_engine_idle
from jaxserve.entrypoints import bench
from jaxserve.entrypoints.cli import main as cli_main
from jaxserve.entrypoints.client import Client

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")


@pytest.fixture(scope="module")
def server(loop, engine):
    frontend = loop.start_frontend(engine)
    yield frontend
    loop.run(frontend.stop(0))


def _bench(server, tmp_path, *flags):
    out = tmp_path / "bench.json"
    rc = cli_main(["bench", "--server", f"127.0.0.1:{server.port}", "--json", str(out), *flags])
    return rc, json.loads(out.read_text()) if out.exists() else None


def test_workload_fit_clamps_to_max_model_len():
    w = bench.Workload()  # the defaults: prompt 32-512, output 32-256
    fitted, note = w.fit(512)
    (p_lo, p_hi), (o_lo, o_hi) = fitted.prompt_len, fitted.output_len
    assert p_hi + o_hi == 512 and (p_lo, o_lo) == (32, 32) and p_hi < 512 and o_hi <= 256
    assert "max_model_len is 512" in note and "clamped" in note
    assert all(len(p) + n <= 512 for p, n in fitted.requests(1024))
    assert w.fit(4096) == (w, None)  # fits already: unchanged, no note
    tiny, _ = w.fit(8)
    assert tiny.prompt_len[1] + tiny.output_len[1] == 8 and tiny.prompt_len[0] <= tiny.prompt_len[1] < 8
    with pytest.raises(ValueError):
        w.fit(1)


def test_bench_defaults_against_the_cpu_preset_server(server, engine, tmp_path, capsys):
    """The scenario of the issue (defaults against a max_model_len-512 server), few requests."""
    rc, summary = _bench(server, tmp_path, "--num-requests", "4")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert summary["max_model_len"] == 512 and summary["prompt_len"][1] + summary["output_len"][1] <= 512
    assert summary["requests"] == summary["completed"] == 4 and summary["failed"] == 0 and summary["errors"] == {}
    assert "clamped" in out and "max_model_len" in out  # it says what it changed
    assert "| TTFT |" in out and "| E2E |" in out and "4 completed, 0 refused/failed" in out
    assert summary["ttft_p50_ms"] > 0 and summary["output_tokens"] >= 4 * 32
    wait_engine_idle(engine)


def test_refused_requests_are_counted_not_fatal(loop, engine, tmp_path, capsys):
    """A server that admits one generation at a time refuses the rest (RESOURCE_EXHAUSTED): the run
    completes, the table counts the refusals by code."""
    capped = loop.start_frontend(engine, max_concurrent=1)
    try:
        rc, summary = _bench(capped, tmp_path, "--num-requests", "3", "--output-len", "32-64")
    finally:
        loop.run(capped.stop(0))
    out = capsys.readouterr().out
    assert rc == 0 and "Traceback" not in out
    assert summary["completed"] >= 1 and summary["failed"] >= 1
    assert summary["errors"] == {"RESOURCE_EXHAUSTED": summary["failed"]}
    assert summary["completed"] + summary["failed"] == 3
    assert "| RESOURCE_EXHAUSTED |" in out and "| TTFT |" in out
    wait_engine_idle(engine)


def test_no_fit_sends_oversized_requests_and_counts_their_refusal(server, engine, tmp_path, capsys):
    """What crashed the old bench: prompt + max_tokens > max_model_len gets INVALID_ARGUMENT,
    here counted for exactly the requests that do not fit, while the others are served."""
    with Client(server.address, timeout=30) as c:
        vocab = c.model_info().vocab_size
    work = bench.Workload(6).requests(vocab)  # the default lengths
    too_long = sum(len(p) + n > 512 for p, n in work)
    assert 0 < too_long < 6  # the fixed seed draws both kinds
    rc, summary = _bench(server, tmp_path, "--num-requests", "6", "--no-fit")
    out = capsys.readouterr().out
    assert rc == 0
    assert summary["errors"] == {"INVALID_ARGUMENT": too_long} and summary["completed"] == 6 - too_long
    assert "| INVALID_ARGUMENT |" in out and "max_model_len" in out
    wait_engine_idle(engine)


class _FlakyClient:
    """Stands in for AsyncClient: request 2 is refused before any token, request 4 fails mid-stream,
    request 5 raises a client-side exception; the others stream their tokens."""

    def __init__(self):
        self.n = 0

    async def model_info(self):
        class Info:
            model, vocab_size, max_model_len = "fake", 100, 64
        return Info()

    async def generate_stream(self, prompt, params):
        self.n += 1
        n = self.n
        if n == 2:
            raise grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="max_tokens 60 does not fit")
        for i in range(params.max_tokens):
            if n == 4 and i == 2:
                raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           details="engine error")
            if n == 5:
                raise RuntimeError("decoder blew up")
            await asyncio.sleep(0)

            class Out:
                token_ids = [7]

            class Delta:
                outputs = [Out()]
            yield Delta()


def test_injected_failures_are_counted():
    notes = []
    summary = asyncio.run(bench.run("unused", bench.Workload(6, (8, 40), (5, 40)), client=_FlakyClient(),
                                    notify=notes.append))
    assert summary["requests"] == 6 and summary["completed"] == 3 and summary["failed"] == 3
    assert summary["errors"] == {"INVALID_ARGUMENT": 1, "INTERNAL": 1, "RuntimeError": 1}
    assert summary["error_examples"]["INTERNAL"] == "engine error"
    assert notes and "max_model_len is 64" in notes[0]
    table = bench.format_table(summary)
    assert "3 completed, 3 refused/failed" in table and "| INVALID_ARGUMENT | 1 | max_tokens 60 does not fit |" in table


def test_bench_without_a_server_reports_an_error(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli_main(["bench", "--server", f"127.0.0.1:{port}", "--num-requests", "1"]) == 1
    err = capsys.readouterr().err
    assert "error: cannot query the server" in err and "UNAVAILABLE" in err
