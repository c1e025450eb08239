"""The built-in demo model: a small Llama with RANDOM weights and a locally trained tokenizer.

It makes noise, not sense. It exists so that `make serve`, `jaxserve serve` and every other
command work on a fresh machine with no network: nothing is downloaded. The tokenizer is a
byte-level BPE trained on `demo/corpus.txt`, which ships with the package; the weights are
drawn from a fixed seed; both are written once, in Hugging Face format, to a cache directory.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

DEMO_VERSION = "v2"  # v2: the chat template renders tools (hermes style)
RANDOM_WEIGHTS_WARNING = (
    "the jaxserve demo model has RANDOM weights: its output is noise, not language. "
    "Pass a real model (a local HF directory or a hub id) for meaningful text."
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|pad|>"]
# Llama-3 headers with hermes-style tools (as Qwen / Hermes models render them, kept short: the
# demo's 1k-token vocabulary spends many tokens on JSON): the tools' functions go into a system
# turn inside <tools></tools>, calls are <tool_call>{"name", "arguments"}</tool_call>
# (what `--tool-call-parser hermes` reads), tool results come back inside <tool_response>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}\n\n{% endif %}"
    "Functions you may call:\n<tools>\n{% for tool in tools %}{{ tool['function'] | tojson }}\n{% endfor %}"
    "</tools>\nCall one as <tool_call>\n{\"name\": <name>, \"arguments\": <object>}\n</tool_call><|eot_id|>{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"  # already in the tools turn
    "{% elif message['role'] == 'tool' %}<|start_header_id|>tool<|end_header_id|>\n\n"
    "<tool_response>\n{{ message['content'] | trim }}\n</tool_response><|eot_id|>"
    "{% else %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ (message['content'] or '') | trim }}"
    "{% for call in message.get('tool_calls') or [] %}<tool_call>\n{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}}\n</tool_call>{% endfor %}<|eot_id|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
ARCH = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, max_position_embeddings=2048)
TOKENIZER_VOCAB = 1024
MARKER = ".jaxserve-demo-model.json"  # lists the files written: only those are ever removed
_LEGACY_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def cache_dir() -> Path:
    """`$JAXSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxserve`, else `~/.cache/jaxserve`."""
    if os.environ.get("JAXSERVE_CACHE_DIR"):
        return Path(os.environ["JAXSERVE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxserve"


def default_demo_dir() -> Path:
    return cache_dir() / f"demo-model-{DEMO_VERSION}"


class DemoModelError(RuntimeError):
    """The demo model cannot be written where asked (the message says why and what to do)."""


def is_demo_model(path: Path) -> bool:
    """True if `path` is a directory that this module wrote and that holds nothing else: the
    marker file lists the files written (a demo model written before the marker existed is
    recognised by the `jaxserve_demo` key of its config.json and the known file set). A
    directory with any other file or sub-directory in it is NOT a demo model."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    known = _written_files(path)
    if known is None:
        return False
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    return all(e.name in known and e.is_file(follow_symlinks=False) for e in entries)


def _written_files(path: Path) -> set[str] | None:
    """The names a demo model in `path` may hold, from its marker (or legacy config); None if it is not one."""
    marker = path / MARKER
    try:
        if marker.is_file() and not marker.is_symlink():
            data = json.loads(marker.read_text())
            if data.get("jaxserve_demo_model") is True and isinstance(data.get("files"), list):
                return {str(f) for f in data["files"]} | {MARKER}
            return None
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, AttributeError):
        return None
    return set(_LEGACY_FILES) if isinstance(cfg, dict) and "jaxserve_demo" in cfg else None


def ensure_demo_model(path: Path | None = None) -> Path:
    """Returns the demo model directory, writing it first if it is not there yet.

    Safe when several processes start at once: they take a lock file beside the directory, so one
    writes and the others wait and reuse it; and the directory is only ever renamed into place
    complete, so a reader never sees half a model. An existing complete demo model is never
    rewritten here (a process may be reading it)."""
    path = Path(path).expanduser() if path is not None else default_demo_dir()
    if not _is_complete(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock(path.parent / f".{path.name}.lock"):
            if not _is_complete(path):
                write_demo_model(path, replace=False)
    log.warning(RANDOM_WEIGHTS_WARNING)
    return path


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and _written_files(path) is not None


class _lock:
    """An exclusive advisory lock on a file (fcntl where it exists; a no-op elsewhere)."""

    def __init__(self, path: Path):
        self.path, self._fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: the atomic rename still keeps readers safe
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the lock file stays (removing it would race)
        return False


def train_tokenizer():
    """A byte-level BPE tokenizer trained on the corpus that ships with the package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = resources.files("jaxserve").joinpath("demo/corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|pad|>", chat_template=CHAT_TEMPLATE, model_max_length=ARCH["max_position_embeddings"],
    )


def random_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 tensors drawn from a fixed seed (norm weights are ones)."""
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, n, k = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": np.ones(d, np.float32),
               "lm_head.weight": w(v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
            p + "self_attn.q_proj.weight": w(n * h, d), p + "self_attn.k_proj.weight": w(k * h, d),
            p + "self_attn.v_proj.weight": w(k * h, d), p + "self_attn.o_proj.weight": w(d, n * h),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
        })
    return tensors


def write_demo_model(path: Path, seed: int = 0, *, force: bool = False, replace: bool = True,
                     notify: Callable[[str], None] | None = None) -> Path:
    """Writes the demo model in HF format to `path`, atomically: into a temp dir beside it, then
    one rename. Nothing of the user's is ever deleted:

    - `path` missing, or an empty directory: the new model is renamed into place.
    - `path` is a demo model that this module wrote (marker file, nothing else in it) and `replace`:
      it is replaced (the old one is renamed aside, then its own listed files are removed).
    - `path` is anything else (a non-empty directory, a file, a symlink): DemoModelError, unless
      `force`, which renames it aside to `PATH.bak-N` (kept, never deleted) and reports it
      through `notify` (default: a log warning).
    """
    path = Path(path).expanduser()
    _check_target(path, force)  # fail before minutes of work, not after
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_files(tmp, seed)
        _install(tmp, path, force=force, replace=replace, notify=notify or log.warning)
    finally:
        if tmp.exists():  # our own mkdtemp directory (only when something failed)
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote the demo model (random weights) to %s", path)
    return path


def _check_target(path: Path, force: bool) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        if not force:
            kind = "a symlink" if path.is_symlink() else "not a directory"
            raise DemoModelError(f"{path} exists and is {kind}; refusing to write the demo model there "
                                 f"(pass --force to move it aside to {path.name}.bak-N and write a new one)")
    elif path.is_dir() and any(path.iterdir()) and not is_demo_model(path) and not force:
        raise DemoModelError(f"{path} is a non-empty directory that is not a jaxserve demo model; refusing "
                             f"to write there (nothing was changed). Choose a new or empty directory, or pass "
                             f"--force to move the existing one aside to {path.name}.bak-N (nothing is deleted)")


def llama_config(tokenizer, arch: dict, **extra) -> dict:
    """config.json of a float32 Llama with `arch`'s shapes (ARCH's keys) for `tokenizer`: its
    vocabulary padded to a multiple of 64, as real checkpoints do, and its special tokens."""
    vocab = -(-len(tokenizer) // 64) * 64
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **arch, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id, "dtype": "float32", "hidden_act": "silu", **extra,
    }


def write_hf_files(path: Path, tokenizer, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """The tokenizer files, config.json, generation_config.json (greedy) and model.safetensors
    (HF-named float32 `tensors`) into the existing directory `path`."""
    from safetensors.numpy import save_file

    tokenizer.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _write_files(tmp: Path, seed: int) -> None:
    tokenizer = train_tokenizer()
    config = llama_config(tokenizer, ARCH,
                          jaxserve_demo={"version": DEMO_VERSION, "random_weights": True, "seed": seed})
    write_hf_files(tmp, tokenizer, config, random_weights(config, seed))
    files = sorted(e.name for e in os.scandir(tmp))
    marker = {"jaxserve_demo_model": True, "version": DEMO_VERSION, "seed": seed, "files": files,
              "note": "written by `jaxserve demo-model`; jaxserve may replace this directory (only these files)"}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _install(tmp: Path, path: Path, *, force: bool, replace: bool, notify: Callable[[str], None]) -> None:
    """Renames the complete `tmp` to `path` (see write_demo_model for what happens to an existing `path`)."""
    try:
        os.rename(tmp, path)  # atomic; replaces only a missing path or an EMPTY directory
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
    if not replace and _is_complete(path) and is_demo_model(path):
        return  # another process got there first (ensure_demo_model): use its copy, ours is discarded
    demo = replace and is_demo_model(path)
    if not demo and not force:
        _check_target(path, force=False)  # raises with the reason (it changed since the first check)
        raise DemoModelError(f"{path} changed while the demo model was written; nothing was changed")
    aside = _aside_name(path, demo)
    os.rename(path, aside)  # the old one, whole, under a new name: nothing is lost if the next step fails
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(aside, path)  # something appeared at `path` meanwhile: put the old one back
        raise DemoModelError(f"{path} changed while the demo model was written; nothing was changed") from None
    if demo and is_demo_model(aside):  # checked again after the rename: nothing of the user's slipped in
        try:
            _remove_demo_files(aside)
            return
        except OSError:
            pass
    if demo:
        notify(f"the old demo model was kept at {aside} (files jaxserve did not write appeared in it)")
    else:
        notify(f"moved the existing {path} aside to {aside} (--force; nothing was deleted)")


def _aside_name(path: Path, demo: bool) -> Path:
    base = f"{path.name}.old-" if demo else f"{path.name}.bak-"
    n = 1
    while os.path.lexists(path.parent / f"{base}{n}"):
        n += 1
    return path.parent / f"{base}{n}"


def _remove_demo_files(path: Path) -> None:
    """Removes a demo model directory written by this module: its own files by name, then the
    (now empty) directory with rmdir, which fails rather than delete anything else in it."""
    for name in _written_files(path) or ():
        try:
            (path / name).unlink()
        except FileNotFoundError:
            pass
    os.rmdir(path)
