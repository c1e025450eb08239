"""Gemma under tensor parallelism: four fake CPU devices in a subprocess (sharded_model_check.py),
2 kv heads split over 2 devices or copied over 4, through XLA and through a Pallas kernel under
shard_map (Gemma 2's attention soft cap inside the kernel; Gemma 3's q/k norms and per-layer-type
RoPE), give the single-device logits with the KV cache sharded and updated in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemma_fixtures import save_hf_gemma

HERE = Path(__file__).parent


# Gemma 3 (local + global layers, qk norm) by default, with kv heads split over 2 devices (XLA) and
# copied over 4 (the GPU kernel through shard_map); its other two runs and Gemma 2 (soft caps: one run
# of all four was ~20 s on 2 cores) are slow. test_layer_scan.py runs all four on a Llama in make test,
# and test_gemma.py checks Gemma 2 against transformers on one device.
@pytest.mark.parametrize("name,chosen", [("gemma3", "2:reference,4:pallas_gpu"),
                                       pytest.param("gemma3", "4:reference,2:pallas_gpu", marks=pytest.mark.slow),
                                       pytest.param("gemma2", "", marks=pytest.mark.slow)])
def test_tensor_parallel_gives_single_device_logits(name, chosen, tmp_path):
    save_hf_gemma(name, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "SHARDED_MODEL_RUNS": chosen}
    proc = subprocess.run([sys.executable, str(HERE / "sharded_model_check.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    runs = results[0]
    want = np.asarray(runs["model=1,reference"]["logits"])
    for run_name, run in runs.items():
        np.testing.assert_allclose(np.asarray(run["logits"]), want, rtol=0, atol=1e-5 * np.abs(want).max(),
                                   err_msg=run_name)
        assert run["in_place"], run_name
        if run_name != "model=1,reference":
            assert run["kv_spec"] == run["want_spec"] and "'model'" in run["kv_spec"], run_name
    for run_name in ("model=4,reference", "model=4,pallas_gpu"):
        if run_name in runs:
            assert runs[run_name]["kv_head_replicas"] == 2 and runs[run_name]["kv_shard"][3] == 2, run_name
