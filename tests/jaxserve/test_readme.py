"""The README's Python examples run as written (on the demo model), each in a fresh interpreter."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def runnable_blocks() -> list[str]:
    # The blocks that build an engine are whole programs; the rest are fragments (one call shown).
    return [b for b in python_blocks() if "LLM(" in b or "AsyncLLM." in b]


def test_readme_has_a_python_and_an_async_example():
    blocks = runnable_blocks()
    assert any("LLM(None" in b for b in blocks) and any("AsyncLLM" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_python_example_runs_as_written(index, tmp_path):
    code = runnable_blocks()[index]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXSERVE_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "the example printed nothing"
