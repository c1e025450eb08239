"""The built-in demo model and the CLI commands that stand on it."""

import concurrent.futures
import json
import os

import pytest
from transformers import AutoTokenizer

from jaxserve.entrypoints import cli
from jaxserve.demo_model import (MARKER, RANDOM_WEIGHTS_WARNING, DemoModelError, default_demo_dir, ensure_demo_model,
                                 is_demo_model, write_demo_model)
from jaxserve.models.loader import load_model


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


# --- nothing of the user's is ever deleted (issue 13, item 8) ---

def _snapshot(root):
    """Every path under root with its bytes (files), its target (links) or None (dirs), and mtimes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", None)
        else:
            out[rel] = ("file", p.read_bytes(), p.stat().st_mtime_ns)
    return out


@pytest.fixture
def users_folder(tmp_path):
    """A folder of the user's: files, a sub-directory, a hidden file, a symlink, even a config.json."""
    d = tmp_path / "models"
    (d / "llama" / "weights").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / ".hidden").write_bytes(b"\x00\x01secret")
    (d / "config.json").write_text('{"model_type": "llama"}\n')
    (d / "llama" / "weights" / "model.safetensors").write_bytes(b"not really weights" * 100)
    (d / "link").symlink_to(d / "notes.txt")
    return d


def test_cli_demo_model_refuses_a_users_non_empty_directory(users_folder, capsys):
    before = _snapshot(users_folder)
    siblings = sorted(p.name for p in users_folder.parent.iterdir())
    assert cli.main(["demo-model", str(users_folder)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not a jaxserve demo model" in err and "--force" in err and "Traceback" not in err
    assert _snapshot(users_folder) == before  # every file untouched, nothing added
    assert sorted(p.name for p in users_folder.parent.iterdir()) == siblings  # no temp dir left beside it


def test_cli_demo_model_refuses_a_file_and_a_symlink(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    assert cli.main(["demo-model", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err and f.read_text() == "keep me"
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "ln").symlink_to(target)
    assert cli.main(["demo-model", str(tmp_path / "ln")]) == 2
    assert "symlink" in capsys.readouterr().err and list(target.iterdir()) == []


def test_cli_demo_model_force_moves_the_users_directory_aside(users_folder, capsys):
    before = _snapshot(users_folder)
    assert cli.main(["demo-model", str(users_folder), "--force"]) == 0
    captured = capsys.readouterr()
    backup = users_folder.parent / "models.bak-1"
    assert str(backup) in captured.err and "nothing was deleted" in captured.err
    assert _snapshot(backup) == before  # the user's folder, whole, under a new name
    assert is_demo_model(users_folder) and (users_folder / "model.safetensors").is_file()
    # a second --force on the demo model now there replaces it, and leaves the backup alone
    assert cli.main(["demo-model", str(users_folder), "--force"]) == 0
    assert _snapshot(backup) == before and not (users_folder.parent / "models.bak-2").exists()


def test_demo_model_into_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    assert cli.main(["demo-model", str(tmp_path / "empty")]) == 0
    assert is_demo_model(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_an_existing_demo_model_is_replaced(tmp_path, demo_dir):
    target = tmp_path / "demo"
    write_demo_model(target, seed=1)
    assert json.loads((target / "config.json").read_text())["jaxserve_demo"]["seed"] == 1
    assert cli.main(["demo-model", str(target)]) == 0  # no --force needed: it is ours
    assert json.loads((target / "config.json").read_text())["jaxserve_demo"]["seed"] == 0
    assert (target / "model.safetensors").read_bytes() == (demo_dir / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # the old one is gone, no temp dirs left


def test_a_demo_model_with_a_users_file_in_it_is_not_replaced(tmp_path, capsys):
    target = tmp_path / "demo"
    write_demo_model(target)
    (target / "my-finetune-notes.md").write_text("mine")
    before = _snapshot(target)
    assert not is_demo_model(target)
    assert cli.main(["demo-model", str(target)]) == 2
    assert "not a jaxserve demo model" in capsys.readouterr().err and _snapshot(target) == before
    with pytest.raises(DemoModelError):
        write_demo_model(target)
    assert _snapshot(target) == before


def test_a_legacy_demo_model_without_marker_is_recognised(tmp_path):
    target = write_demo_model(tmp_path / "old")
    (target / MARKER).unlink()  # as written before the marker existed
    assert is_demo_model(target)
    assert ensure_demo_model(target) == target and not (target / MARKER).exists()  # used as it is
    write_demo_model(target)
    assert (target / MARKER).is_file()


def test_ensure_demo_model_refuses_a_foreign_directory_at_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path))
    foreign = default_demo_dir()
    foreign.mkdir(parents=True)
    (foreign / "something.bin").write_bytes(b"x")
    with pytest.raises(DemoModelError, match="not a jaxserve demo model"):
        ensure_demo_model()
    assert [p.name for p in foreign.iterdir()] == ["something.bin"]


def test_ensure_demo_model_concurrent_first_use(tmp_path, monkeypatch):
    """Several threads (as several processes would) ask for the model at once: one writes it,
    all get the same complete directory, nothing is rewritten under a reader, no temp dir is left."""
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path))
    import jaxserve.demo_model as dm

    calls = []
    real = dm._write_files
    monkeypatch.setattr(dm, "_write_files", lambda tmp, seed: (calls.append(tmp), real(tmp, seed)))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: ensure_demo_model(), range(3)))
    assert len(set(paths)) == 1 and is_demo_model(paths[0]) and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{paths[0].name}.lock", paths[0].name]


def test_install_race_keeps_the_first_complete_copy(tmp_path):
    """Without the lock (another host on a shared cache, say), the loser of the rename race
    discards its own copy and uses the winner's: a directory being read is never replaced."""
    target = write_demo_model(tmp_path / "m")  # the winner's copy
    ino = target.stat().st_ino
    write_demo_model(target, replace=False)  # the loser, who checked before the winner's rename
    assert target.stat().st_ino == ino and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --- quiet logs (issue 19, item 6) ---

def _cli_stderr(*args: str) -> str:
    import subprocess
    import sys
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "jaxserve.entrypoints.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def _library_info_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " INFO absl" in line or " INFO orbax" in line]


def test_convert_and_serving_a_converted_checkpoint_print_no_absl_info(demo_dir, tmp_path):
    # At --log-level debug orbax's INFO lines (through absl) are there: the check below can fail.
    loud = _cli_stderr("--log-level", "debug", "convert", str(demo_dir), str(tmp_path / "loud"))
    assert _library_info_lines(loud), "orbax logged nothing even at debug: this test checks nothing"
    quiet = _cli_stderr("convert", str(demo_dir), str(tmp_path / "orbax"))
    quiet += _cli_stderr("generate", str(tmp_path / "orbax"), "--prompt", "Hi", "--max-tokens", "2")
    assert _library_info_lines(quiet) == []


def test_refused_long_prompt_logs_no_tokenizer_warning(demo_dir, caplog):
    from jaxserve import LLM, SamplingParams
    llm = LLM(str(demo_dir), config="cpu")
    limit = llm.engine.tokenizer.model_max_length
    # More tokens than the tokenizer's model_max_length (" x" is two tokens), yet few enough characters to be
    # tokenized rather than refused on its length alone.
    long_prompt = " x" * (limit // 2 + 10)
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="max_model_len") as refused:
        llm.generate([long_prompt], SamplingParams(max_tokens=2))
    assert int(str(refused.value).split("prompt has ")[1].split()[0]) > limit  # it was tokenized
    assert not [r for r in caplog.records if "Token indices sequence length" in r.getMessage()]
    assert llm.generate(["Hi"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
