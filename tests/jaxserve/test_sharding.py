"""Multi-device meshes on CPU: tensor and data parallelism with 8 fake devices, two
processes with jax.distributed, mesh validation, and the mesh presets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine_fixtures import write_engine_test_model
from jaxserve.config import EngineConfig
from jaxserve.sharding import MeshConfig, MeshError, parse_mesh
from jaxserve.models.config import ModelConfig

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CPU = str(ROOT / "configs" / "cpu.yaml")


@pytest.fixture(scope="module")
def model8(tmp_path_factory):
    """The engine test model with 8 query heads over 2 kv heads (so model=8 divides the heads
    and kv heads are copied from model=4 up)."""
    path = tmp_path_factory.mktemp("model8")
    write_engine_test_model(path, num_heads=8)
    return path


def run_script(args: list[str], timeout: int = 600) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    return results


# make test: kv heads split (model=2), data and tensor parallel at once with kv heads copied
# (data=2,model=4); model=4 and model=8 (one q head a device) are slow.
@pytest.mark.parametrize("meshes", [["model=1", "model=2", "data=2,model=4"],
                                    pytest.param(["model=1", "model=4", "model=8"], marks=pytest.mark.slow)],
                         ids=["tp2-dp2tp4", "tp4-tp8"])
def test_tensor_and_data_parallel_meshes_give_identical_tokens(model8, meshes):
    (result,) = run_script([str(HERE / "mesh_check.py"), str(model8), CPU, *meshes])
    assert result["devices"] == 8
    runs = result["meshes"]
    for mesh in meshes:
        assert runs[mesh]["tokens"] == runs["model=1"]["tokens"], mesh
        assert runs[mesh]["free_pages"] == runs[mesh]["total_pages"]
        model = parse_mesh(mesh)["model"]
        assert runs[mesh]["q_spec"] == "P(None, None, 'model', None)"  # [layers, embed, heads, head_dim]
        assert runs[mesh]["q_shard"][1:] == [64, 8 // model, 8]  # heads split over the model axis
    # 2 kv heads split over 2 devices; over 4 or 8: each copied 2 or 4 times, split one head per device.
    for mesh in meshes[1:]:
        assert runs[mesh]["kv_spec"] == "P(None, None, None, 'model', None)", mesh
    if "data=2,model=4" in runs:
        assert runs["data=2,model=4"]["replicas"] == 2
        assert runs["data=2,model=4"]["replica_devices"] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(model_dir: Path, n: int, mode: str) -> list[dict]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_check.py"), f"127.0.0.1:{port}", str(n), str(i),
                               str(model_dir), CPU, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return sorted(results, key=lambda r: r["process"])


def test_two_processes_serve_like_one(model8):
    (single,) = run_processes(model8, 1, "offline")
    leader, follower = run_processes(model8, 2, "serve")
    assert leader["processes"] == 2 and leader["devices"] == 2 and leader["q_devices"] == 2
    assert leader["tokens"] == single["tokens"]
    assert follower["tokens"] is None  # only process 0 serves
    # Lockstep: the same steps and the same collectives on both; every command fit the
    # fixed-size header (no payload collective), and between syncs nobody called one.
    counts = leader["counts"]
    print(counts)
    assert follower["counts"] == counts
    assert counts["payload_collectives"] == 0
    assert 0 < counts["collectives"] < counts["steps"]


# The stopped follower (alive, silent: only the collective's own timeout can end the wait) runs by
# default; the killed one (its connections close, the broadcast fails at once) is marked slow.
@pytest.mark.parametrize("how", [pytest.param("killed", marks=pytest.mark.slow), "stopped"])
def test_dead_follower_kills_the_leader_engine_within_the_bound(model8, how):
    """Multi-host, the follower dies (SIGKILL: its connections close) or hangs (SIGSTOP: they
    stay open, nothing answers) while the leader serves: the leader's next broadcast fails
    (at once when killed, after JAXSERVE_COLLECTIVE_TIMEOUT_S when stopped), so its in-flight
    request ends with EngineDeadError naming the broadcast and the engine reports unhealthy,
    instead of the leader hanging in the collective forever."""
    import signal
    import time

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXSERVE_COLLECTIVE_TIMEOUT_S": "3"}
    procs = [subprocess.Popen([sys.executable, "-u", str(HERE / "multihost_check.py"), f"127.0.0.1:{port}", "2",
                               str(i), str(model8), CPU, "peer_dies"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env) for i in range(2)]
    leader, follower = procs
    try:
        for line in leader.stdout:
            if line.startswith("STREAMING"):
                break
        else:
            pytest.fail("the leader never streamed")
        follower.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        killed_at = time.monotonic()
        out, _ = leader.communicate(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    (result,) = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    print(result, f"{elapsed:.2f} s")
    assert leader.returncode == 0
    assert result["error"].startswith("EngineDeadError") and "broadcast" in result["error"], result
    assert result["healthy"] is False
    assert 0 < result["tokens"] < 400  # it stopped mid-request (communicate's 60 s bounds the wait)
    if how == "stopped":  # the collective's own timeout fired, not an outside one
        assert "did not complete within 3 s" in result["error"]


def test_invalid_meshes_are_refused_with_what_to_change():
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    devices = [object()] * 6
    with pytest.raises(MeshError, match="needs 8 devices, but 6 are visible"):
        MeshConfig(data=2, model=4).validate_for(cfg, devices)
    with pytest.raises(MeshError, match=r"model axis \(3\) must divide num_attention_heads \(4\).*\[1, 2, 4\]"):
        MeshConfig(model=3).validate_for(cfg, devices)
    with pytest.raises(MeshError, match=r"\['embed', 'mlp'\] of one array on the same mesh axis"):
        MeshConfig(rules={"embed": "model", "mlp": "model"})
    with pytest.raises(MeshError, match="unknown logical axis 'experts'"):
        MeshConfig(rules={"experts": "model"})
    with pytest.raises(MeshError, match="only be split over the 'model' axis"):
        MeshConfig(rules={"heads": "data"})
    with pytest.raises(MeshError, match="data=D,model=M"):
        parse_mesh("pipeline=2")
    with pytest.raises(MeshError, match="positive sizes"):
        EngineConfig.load(CPU, mesh="data=0,model=1")
    with pytest.raises(ValueError, match="data_parallel_size must be a positive integer"):
        EngineConfig.load(CPU, data_parallel_size=0)


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_presets_load_with_valid_meshes(preset):
    cfg = EngineConfig.load(ROOT / "configs" / preset)
    mesh = cfg.mesh
    assert mesh.num_devices >= 1 and dict(mesh.rules)["heads"] in ("model", None)
    over = EngineConfig.load(ROOT / "configs" / preset, mesh="data=1,model=2")
    assert (over.data_parallel_size, over.tensor_parallel_size) == (1, 2)


# (devices, kv heads) cases of sharded_attention_check.py. The TPU kernel in interpret mode is the slow one
# (its check alone: 21 s for all four cases, 10.7 s for two): make test runs it split (2:4) and copied (4:2),
# the GPU kernel all four; the TPU kernel's other two (kv == tp, one head copied to 4 devices) are slow.
ALL_CASES = "2:4,2:2,4:2,4:1"


def case_names(cases: str) -> set[str]:
    """SHARDED_ATTENTION_CASES ("2:4,4:2") as sharded_attention_check.py names its results."""
    return {f"model={m},kv_heads={k}" for m, k in (c.split(":") for c in cases.split(","))}


@pytest.mark.parametrize("backend,cases", [("pallas_tpu", "2:4,4:2"),
                                           pytest.param("pallas_tpu", "2:2,4:1", marks=pytest.mark.slow),
                                           ("pallas_gpu", ALL_CASES)])
def test_pallas_kernels_through_shard_map_equal_reference(backend, cases, monkeypatch):
    """Kernels are opaque to XLA's partitioner: under a mesh they run per device through
    shard_map on their own kv heads: split over the devices, or copied when fewer than them."""
    monkeypatch.setenv("SHARDED_ATTENTION_CASES", cases)
    (errors,) = run_script([str(HERE / "sharded_attention_check.py"), backend])
    assert set(errors) == case_names(cases)
    assert max(errors.values()) < 2e-5, errors


def test_command_broadcast_header_and_payload_collectives(monkeypatch):
    # One process: broadcast_one_to_all is the identity, so this checks the wire format and
    # how many collectives each payload size takes (the header only, up to HEADER_BYTES).
    from jax.experimental import multihost_utils

    from jaxserve.engine import async_llm

    sizes = []
    real = multihost_utils.broadcast_one_to_all
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: sizes.append(x.size) or real(x))
    inline = async_llm.HEADER_BYTES - 8
    for n, want in [(0, [4096]), (9, [4096]), (inline, [4096]), (inline + 1, [4096, 4096]),
                    (5000, [4096, 8192]), (70000, [4096, 131072])]:
        sizes.clear()
        payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
        assert async_llm._broadcast_bytes(payload, 7) == (payload, 7)
        assert sizes == want, n
