import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxserve.engine.detokenizer import IncrementalDetokenizer

CORPUS = ["héllo wörld 日本語 🙂 naïve café", "the quick brown fox says héllo to the 世界 🙂🚀",
          "Ünïcödé text: ñ ç ø å 東京 北京 😀", "hello world, hello tokens; STOP here"] * 3
MULTIBYTE_TEXT = "héllo 日本語 🙂🚀 naïve 東京 😀 ☃ ø"
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _trainer(vocab_size, specials, **kw):
    return trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                               show_progress=False, **kw)


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, _trainer(330, ["<s>", "</s>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _sentencepiece_style() -> PreTrainedTokenizerFast:
    """Llama-2 style: Metaspace pieces, byte-fallback tokens <0x..>, strip one leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, _trainer(200, ["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


BYTE_LEVEL = _byte_level()
SENTENCEPIECE = _sentencepiece_style()


def decode(tok, ids, skip=True):
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def without_incomplete_char(text):
    """Prompt text as the detokenizer sees it: an incomplete last character is output's."""
    return text[:-1] if text.endswith("\ufffd") else text


def stream(detok, ids, chunks=None):
    """Feed ids in chunks (default: one at a time); return the list of deltas."""
    chunks = chunks or [1] * len(ids)
    deltas, pos = [], 0
    for n in chunks:
        deltas.append(detok.append(ids[pos:pos + n]))
        pos += n
    if pos < len(ids):
        deltas.append(detok.append(ids[pos:]))
    return deltas


def token_ids(tok):
    multibyte = encode(tok, MULTIBYTE_TEXT)
    return st.lists(st.one_of(st.integers(0, len(tok) - 1), st.sampled_from(multibyte)),
                    max_size=40)


def test_multibyte_characters_are_split_across_tokens():
    # Guard for the tests below: the fixtures really do split characters across tokens.
    for tok in (BYTE_LEVEL, SENTENCEPIECE):
        ids = encode(tok, MULTIBYTE_TEXT)
        assert any("\ufffd" in decode(tok, [i]) for i in ids)
        detok = IncrementalDetokenizer(tok, [])
        deltas = stream(detok, ids)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) + detok.flush() == MULTIBYTE_TEXT


@FAST
@given(ids=token_ids(BYTE_LEVEL), skip=st.booleans(), chunks=st.lists(st.integers(1, 4)))
def test_byte_level_stream_equals_full_decode(ids, skip, chunks):
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], skip_special_tokens=skip)
    streamed = "".join(stream(detok, ids, chunks))
    full = decode(BYTE_LEVEL, ids, skip)
    assert full.startswith(streamed)
    assert "\ufffd" not in streamed or "\ufffd" in full
    assert streamed + detok.flush() == full == detok.output_text
    assert detok.stop_reason is None and detok.token_ids == ids


@FAST
@given(prompt=token_ids(BYTE_LEVEL), ids=token_ids(BYTE_LEVEL), skip=st.booleans())
def test_byte_level_stream_after_random_prompt(prompt, ids, skip):
    # A prompt may end inside a character: its last U+FFFD is not prompt text, and the
    # completed character comes out with the first output token that completes it.
    prompt_text = without_incomplete_char(decode(BYTE_LEVEL, prompt, skip))
    full = decode(BYTE_LEVEL, prompt + ids, skip)
    assert full.startswith(prompt_text)
    detok = IncrementalDetokenizer(BYTE_LEVEL, prompt, skip_special_tokens=skip)
    streamed = "".join(stream(detok, ids))
    want = full[len(prompt_text):]
    if not decode(BYTE_LEVEL, ids, skip):  # no output text: the prompt's U+FFFD stays out
        want = ""
    assert "\ufffd" not in streamed or "\ufffd" in want
    assert streamed + detok.flush() == want


def sentencepiece_ids():
    """Random pieces and encodings of random text (byte-fallback runs of whole characters).

    Not arbitrary byte tokens: tokenizers' ByteFallback decodes a run of byte tokens as a
    whole and turns every byte of an invalid run into U+FFFD, so e.g. decode([<0x00>]) is
    "\x00" but decode([<0x00>, <0x80>]) is "\ufffd\ufffd": no stream that never takes text
    back can match that; the detokenizer then emits "\x00\ufffd", as vLLM does.
    """
    pieces = [i for i in range(len(SENTENCEPIECE))
              if not SENTENCEPIECE.convert_ids_to_tokens(i).startswith("<0x")]
    texts = st.text(alphabet="ab ▁é日本☃🙂\n", max_size=6).map(lambda t: encode(SENTENCEPIECE, t))
    parts = st.lists(st.one_of(st.sampled_from(pieces).map(lambda i: [i]), texts), max_size=12)
    return parts.map(lambda ps: [i for p in ps for i in p])


@FAST
@given(data=st.data(), ids=sentencepiece_ids())
def test_sentencepiece_stream_after_prompt(data, ids):
    prompt_text = data.draw(st.sampled_from(["", "Hello", "héllo wörld", "日本", "the fox "]))
    prompt = encode(SENTENCEPIECE, prompt_text)
    before, after = decode(SENTENCEPIECE, prompt), decode(SENTENCEPIECE, prompt + ids)
    assert after.startswith(before)
    detok = IncrementalDetokenizer(SENTENCEPIECE, prompt)
    streamed = "".join(stream(detok, ids))
    assert streamed + detok.flush() == after[len(before):]


def test_sentencepiece_leading_space_kept_after_prompt():
    ids = encode(SENTENCEPIECE, "Hello world 日本 zz")
    for cut in range(1, len(ids)):
        detok = IncrementalDetokenizer(SENTENCEPIECE, ids[:cut])
        text = "".join(stream(detok, ids[cut:])) + detok.flush()
        assert decode(SENTENCEPIECE, ids[:cut]) + text == "Hello world 日本 zz", cut
    detok = IncrementalDetokenizer(SENTENCEPIECE, encode(SENTENCEPIECE, "Hello"))
    assert detok.append(encode(SENTENCEPIECE, "Hello world")[-1:]) == " world"


def test_skip_special_tokens():
    bos, eos = BYTE_LEVEL.bos_token_id, BYTE_LEVEL.eos_token_id
    ids = [bos] + encode(BYTE_LEVEL, "hi 🙂") + [eos] + encode(BYTE_LEVEL, " there") + [eos]
    for skip, want in [(True, "hi 🙂 there"), (False, "<s>hi 🙂</s> there</s>")]:
        detok = IncrementalDetokenizer(BYTE_LEVEL, [bos, 70], skip_special_tokens=skip)
        assert "".join(stream(detok, ids)) + detok.flush() == want


def test_decodes_only_a_small_window():
    ids = encode(BYTE_LEVEL, " ".join(CORPUS * 3))
    detok = IncrementalDetokenizer(BYTE_LEVEL, ids[:50])
    sizes, real = [], detok._decode
    detok._decode = lambda window: sizes.append(len(window)) or real(window)
    text = "".join(stream(detok, ids[50:]))
    prompt_text = without_incomplete_char(decode(BYTE_LEVEL, ids[:50]))
    assert prompt_text + text + detok.flush() == decode(BYTE_LEVEL, ids)
    assert len(ids) > 400 and max(sizes) <= 8  # the longest character spans <= 4 tokens


def test_prompt_ending_inside_a_character():
    ids = encode(BYTE_LEVEL, "ab 日本語 🙂 cd")
    for cut in range(1, len(ids)):
        prompt_text = without_incomplete_char(decode(BYTE_LEVEL, ids[:cut]))
        detok = IncrementalDetokenizer(BYTE_LEVEL, ids[:cut])
        text = "".join(stream(detok, ids[cut:])) + detok.flush()
        assert prompt_text + text == "ab 日本語 🙂 cd" and "\ufffd" not in text, cut


def test_stop_string_spanning_tokens_is_truncated():
    text = "hello world, hello tokens; STOP here and more"
    ids = encode(BYTE_LEVEL, text)
    pieces = [decode(BYTE_LEVEL, [i]) for i in ids]
    assert "STOP" not in pieces and "; STOP" in text  # the stop spans a token boundary
    for include, want in [(False, "hello world, hello tokens"),
                          (True, "hello world, hello tokens; STOP")]:
        detok = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["; STOP", "zzz"],
                                       include_stop_str_in_output=include)
        deltas = stream(detok, ids)
        assert "".join(deltas) == want == detok.output_text
        assert detok.stop_reason == "; STOP" and detok.finished
        assert detok.flush() == "" and detok.append(ids[:3]) == ""
        consumed = len(detok.token_ids)
        assert want in decode(BYTE_LEVEL, ids[:consumed])
        assert not decode(BYTE_LEVEL, ids[:consumed - 1]).startswith(text[:text.index("STOP") + 4])


def test_stop_hold_back_and_flush():
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["STOP"])
    assert detok.stop_buffer_length == 3
    assert detok.append(encode(BYTE_LEVEL, "hello ST")) == "hello"
    assert detok.output_text == "hello ST"
    assert detok.append(encode(BYTE_LEVEL, "AR")) == " S"
    assert detok.flush() == "TAR" and detok.stop_reason is None
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["STOP"])
    assert detok.append(encode(BYTE_LEVEL, "hello ST")) == "hello"
    assert detok.append(encode(BYTE_LEVEL, "OP now")) == " "
    assert detok.stop_reason == "STOP" and detok.output_text == "hello "


def test_earliest_stop_wins_and_min_tokens():
    ids = encode(BYTE_LEVEL, "abc; xyz")
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["xyz", "c;"])
    assert "".join(stream(detok, ids, [len(ids)])) == "ab" and detok.stop_reason == "c;"
    ids = encode(BYTE_LEVEL, "a STOP b STOP c")
    first_stop_end = next(n for n in range(len(ids)) if "STOP" in decode(BYTE_LEVEL, ids[:n]))
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["STOP"], min_tokens=first_stop_end)
    assert "".join(stream(detok, ids)) == "a STOP b " and detok.stop_reason == "STOP"


@FAST
@given(ids=token_ids(BYTE_LEVEL), data=st.data(), include=st.booleans())
def test_random_stop_strings(ids, data, include):
    full = decode(BYTE_LEVEL, ids)
    if not full:
        return
    i = data.draw(st.integers(0, len(full) - 1))
    stop = full[i:i + data.draw(st.integers(1, 6))]
    if "\ufffd" in stop:
        return
    end = full.find(stop) + (len(stop) if include else 0)
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], stop=[stop, "\x00never"],
                                   include_stop_str_in_output=include)
    seen = ""
    for token in ids:
        seen += detok.append([token])
        assert full[:end].startswith(seen)  # nothing returned is ever taken back
    seen += detok.flush()
    assert seen == full[:end] == detok.output_text and detok.stop_reason == stop


def test_rejects_empty_stop_string():
    with pytest.raises(ValueError, match="stop must be non-empty"):
        IncrementalDetokenizer(BYTE_LEVEL, [], stop=[""])


class CountingTokenizer:
    """A tokenizer without backend_tokenizer (the tokenizer.decode path) that counts work."""

    def __init__(self, tok):
        self.tok, self.calls, self.decoded_ids = tok, 0, 0
        self.all_special_ids = tok.all_special_ids

    def decode(self, ids, **kwargs):
        self.calls += 1
        self.decoded_ids += len(ids)
        return self.tok.decode(ids, **kwargs)


@pytest.mark.parametrize("tok", [BYTE_LEVEL, SENTENCEPIECE], ids=["byte_level", "sentencepiece"])
@pytest.mark.parametrize("stop", [(), ("never stop here", "\x00")])
def test_work_is_linear_in_output_length(tok, stop):
    # Without timing: decode calls and ids decoded per token are bounded by a constant, and
    # the state carried between steps (text not returned yet, stop-search tail) stays small.
    ids = encode(tok, " ".join(CORPUS * 40))
    prompt, ids = ids[:20], ids[20:2020]
    assert len(ids) == 2000
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, prompt, stop=stop)
    counting.calls = counting.decoded_ids = 0
    streamed = ""
    for token in ids:
        streamed += detok.append([token])
        assert detok._pending_length <= detok.stop_buffer_length
        assert len(detok._tail) <= max(map(len, stop), default=1) - 1
    streamed += detok.flush()
    assert streamed == detok.output_text == decode(tok, prompt + ids)[len(decode(tok, prompt)):]
    n = len(ids)
    assert counting.calls <= 1.5 * n  # one decode per token, plus one per window slide
    assert counting.decoded_ids <= 6 * n  # each decode is of a few ids
