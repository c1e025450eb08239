"""The built-in demo model: a small Llama with RANDOM weights and a locally trained tokenizer.

It makes noise, not sense. It exists so that `make serve`, `jaxserve serve` and every other
command work on a fresh machine with no network: nothing is downloaded. The tokenizer is a
byte-level BPE trained on `demo/corpus.txt`, which ships with the package; the weights are
drawn from a fixed seed; both are written once, in Hugging Face format, to a cache directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEMO_VERSION = "v1"
RANDOM_WEIGHTS_WARNING = (
    "the jaxserve demo model has RANDOM weights: its output is noise, not language. "
    "Pass a real model (a local HF directory or a hub id) for meaningful text."
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
ARCH = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, max_position_embeddings=2048)
TOKENIZER_VOCAB = 1024


def cache_dir() -> Path:
    """`$JAXSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxserve`, else `~/.cache/jaxserve`."""
    if os.environ.get("JAXSERVE_CACHE_DIR"):
        return Path(os.environ["JAXSERVE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxserve"


def default_demo_dir() -> Path:
    return cache_dir() / f"demo-model-{DEMO_VERSION}"


def ensure_demo_model(path: Path | None = None) -> Path:
    """Returns the demo model directory, writing it first if it is not there yet."""
    path = Path(path) if path is not None else default_demo_dir()
    if not (path / "config.json").is_file():
        write_demo_model(path)
    log.warning(RANDOM_WEIGHTS_WARNING)
    return path


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


def write_demo_model(path: Path, seed: int = 0) -> Path:
    """Writes the demo model in HF format to `path` (atomically: a temp dir, then a rename)."""
    from safetensors.numpy import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    try:
        tokenizer = train_tokenizer()
        tokenizer.save_pretrained(tmp)
        vocab = -(-len(tokenizer) // 64) * 64  # padded, as real checkpoints do
        eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", **ARCH, "vocab_size": vocab,
            "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id, "dtype": "float32", "hidden_act": "silu",
            "jaxserve_demo": {"version": DEMO_VERSION, "random_weights": True, "seed": seed},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file(random_weights(config, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote the demo model (random weights) to %s", path)
    return path
