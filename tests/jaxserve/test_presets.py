"""Presets by name from any directory; `jaxserve presets` lists every file of configs/."""

from pathlib import Path

import pytest
import yaml

from jaxserve.config import EngineConfig
from jaxserve.entrypoints.cli import main
from jaxserve.preset_catalog import list_presets
from jaxserve.presets import presets_dir, resolve_preset

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_presets_dir_is_the_repository_folder():
    assert presets_dir().resolve() == REPO_CONFIGS.resolve()


def test_by_name_and_by_repo_relative_path_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_preset("cpu") == presets_dir() / "cpu.yaml"
    assert resolve_preset("configs/tpu-v5e-8.yaml") == presets_dir() / "tpu-v5e-8.yaml"
    config = EngineConfig.load("gpu-h200-1")
    assert (config.dtype, config.page_size, config.max_num_seqs) == ("bfloat16", 16, 256)
    assert EngineConfig.load("cpu", max_num_seqs=8).max_num_seqs == 8


def test_a_path_wins_over_a_name(tmp_path, monkeypatch):
    own = tmp_path / "configs" / "cpu.yaml"
    own.parent.mkdir()
    own.write_text("engine:\n  max_num_seqs: 4\n  max_num_batched_tokens: 64\n")
    monkeypatch.chdir(tmp_path)
    assert EngineConfig.load("configs/cpu.yaml").max_num_seqs == 4
    assert EngineConfig.load(str(own)).max_num_seqs == 4


def test_unknown_name_lists_the_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="neither a file nor a preset name.*cpu, cpu-8"):
        EngineConfig.load("no-such-preset")
    with pytest.raises(ValueError, match="neither a file"):
        EngineConfig.load("elsewhere/cpu.yaml")  # a path elsewhere is not silently a preset


def test_listing_matches_the_files(capsys):
    files = sorted(REPO_CONFIGS.glob("*.yaml"), key=lambda f: f.stem)
    presets = {p.name: p for p in list_presets()}
    assert sorted(presets) == [f.stem for f in files]
    for f in files:
        data = yaml.safe_load(f.read_text())
        shape = (data.get("mesh") or {}).get("shape") or {}
        engine = data.get("engine", data)
        p = presets[f.stem]
        assert p.mesh == f"data={shape.get('data', 1)},model={shape.get('model', 1)}"
        assert p.dtype == engine.get("dtype", "auto")
        assert p.token_buckets == tuple(engine["token_buckets"])
        assert p.machine and not p.machine.startswith("#")
        EngineConfig.load(f.stem)  # every preset is a valid config
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line for line in lines[1:] if not line.startswith("(")]
    assert [r.split()[0] for r in rows] == [f.stem for f in files]
    assert "tokens 64,128,256,512,1024,2048 " in next(r for r in rows if r.startswith("tpu-v5e-8 "))
