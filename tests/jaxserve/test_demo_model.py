"""The built-in demo model and the CLI commands that stand on it."""

import json

import pytest
from transformers import AutoTokenizer

from jaxserve.entrypoints import cli
from jaxserve.demo_model import RANDOM_WEIGHTS_WARNING, ensure_demo_model, write_demo_model
from models.loader import load_model


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_demo_model_is_a_loadable_hf_llama(demo_dir):
    cfg = json.loads((demo_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["jaxserve_demo"]["random_weights"] is True
    loaded = load_model(demo_dir)
    tok = AutoTokenizer.from_pretrained(demo_dir)
    assert len(tok) <= loaded.config.vocab_size
    assert set(loaded.config.eos_token_ids) == {tok.convert_tokens_to_ids("<|eot_id|>"),
                                                tok.convert_tokens_to_ids("<|end_of_text|>")}


def test_demo_tokenizer_round_trips_any_text(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    text = "Grüße, 日本語 and emoji 🙂 — text the corpus never saw: qzxj"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_demo_chat_template(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_demo_model_is_deterministic(tmp_path, demo_dir):
    again = write_demo_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_ensure_demo_model_creates_once_and_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path))
    path = ensure_demo_model()
    assert path.parent == tmp_path and (path / "config.json").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model() == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert RANDOM_WEIGHTS_WARNING in caplog.text


def test_cli_generate_on_default_demo_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path))
    assert cli.main(["generate", "--prompt", "Hello", "--max-tokens", "4"]) == 0
    assert "--- prompt: 'Hello'" in capsys.readouterr().out


def test_cli_demo_model_and_convert(tmp_path, capsys):
    assert cli.main(["demo-model", str(tmp_path / "demo")]) == 0
    assert "RANDOM" in capsys.readouterr().out
    assert cli.main(["convert", str(tmp_path / "demo"), str(tmp_path / "orbax")]) == 0
    assert (tmp_path / "orbax" / "jaxserve_checkpoint.json").is_file()
    assert (tmp_path / "orbax" / "tokenizer.json").is_file()
    assert cli.main(["generate", str(tmp_path / "orbax"), "--prompt", "Hi", "--max-tokens", "2"]) == 0


def test_cli_reports_bad_model_without_traceback(tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no config.json" in err
