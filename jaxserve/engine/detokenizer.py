"""Incremental detokenization with stop strings, one request at a time.

Per new token (vLLM's detokenize_incrementally, on ids instead of token strings):

    window = ids from prefix_offset, read = read_offset inside the window
    prefix_text = decode(window[:read]); new_text = decode(window)
    if new_text is longer than prefix_text and does not end in U+FFFD:
        delta = new_text[len(prefix_text):]; prefix_offset, read_offset = read_offset, end
    else: hold the token (an incomplete UTF-8 character, or a skipped special token)

Decoding a window that starts a few tokens back keeps context-dependent decoders right
(SentencePiece strips the leading space of the first token it decodes; byte-level BPE
needs every byte of a character), while each step decodes only a handful of tokens.

Stop strings are searched in the new text only (plus the len(stop) - 1 characters before
it). While streaming, the last max(len(stop)) - 1 characters are held back, because they
could be the start of a stop string (vLLM v1); `flush()` releases them at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

# Prompt tokens decoded as context before the first output token (vLLM uses 5).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def _special_ids(tokenizer: Any) -> frozenset[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # exactly the ids that decode(skip_special_tokens=True) drops
        return frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    return frozenset(getattr(tokenizer, "all_special_ids", ()))


def _decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust decoder directly: no Python-side clean-up pass
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas, honouring stop strings.

    Attributes read by the engine:
      output_text: generated text so far (complete characters; truncated at a stop string;
        includes the held-back tail that `append` has not returned yet).
      stop_reason: the matched stop string, or None.
      token_ids: output ids consumed; after a stop match, the ids after the token that
        completed the stop string are not consumed (the engine may drop them).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: Iterable[str] = (),
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        """min_tokens (extra): stop strings only count once more tokens than this exist."""
        self.stop = tuple(stop)
        if any(not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.stop_buffer_length = (max(map(len, self.stop)) - 1
                                   if self.stop and not include_stop_str_in_output else 0)
        self._decode = _decoder(tokenizer, skip_special_tokens)
        self._skipped_ids = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        prompt = [int(t) for t in prompt_token_ids if int(t) not in self._skipped_ids]
        self._window = prompt[-PROMPT_CONTEXT_TOKENS:]  # ids from prefix_offset on
        self._read = len(self._window)
        # A prompt ending inside a character decodes to one trailing U+FFFD; drop it, so
        # that once output tokens complete the character it is emitted as output.
        self._prefix_text = self._decode(self._window)
        if self._prefix_text.endswith(_REPLACEMENT_CHAR):
            self._prefix_text = self._prefix_text[:-1]
        self.token_ids: list[int] = []
        self.output_text = ""
        self.stop_reason: str | None = None
        self._returned = 0  # characters of output_text handed out so far
        self._check_from = 0  # stop-string search starts len(stop) - 1 before this

    @property
    def finished(self) -> bool:
        """True once a stop string matched; later tokens are ignored."""
        return self.stop_reason is not None

    def append(self, new_token_ids: Iterable[int]) -> str:
        """Consume new output ids; return the text that is now safe to stream."""
        for token_id in new_token_ids:
            if self.finished:
                break
            self.token_ids.append(int(token_id))
            self._add_text(self._decode_next(int(token_id)))
        held = 0 if self.finished else self.stop_buffer_length
        return self._take(len(self.output_text) - held)

    def flush(self) -> str:
        """At the end of the stream: return all text not returned yet.

        Includes the held-back stop-string tail and any incomplete character at the end
        (decoded as U+FFFD, as a full decode would), after a last stop-string check.
        """
        if not self.finished and self._read < len(self._window):
            new_text = self._decode(self._window)
            if len(new_text) > len(self._prefix_text):
                self._add_text(new_text[len(self._prefix_text):])
            self._window, self._read = [], 0
            self._prefix_text = ""
        return self._take(len(self.output_text))

    def _take(self, end: int) -> str:
        if end <= self._returned:
            return ""
        delta, self._returned = self.output_text[self._returned:end], end
        return delta

    def _decode_next(self, token_id: int) -> str:
        if token_id in self._skipped_ids:
            return ""  # decodes to nothing; keeping it out of the window keeps it short
        self._window.append(token_id)
        new_text = self._decode(self._window)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""  # incomplete character: wait for the bytes that complete it
        delta = new_text[len(self._prefix_text):]
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return delta

    def _add_text(self, delta: str) -> None:
        if not delta:
            return
        self.output_text += delta
        if not self.stop or len(self.token_ids) <= self.min_tokens:
            self._check_from = len(self.output_text)
            return
        self._check_stop()
        self._check_from = len(self.output_text)

    def _check_stop(self) -> None:
        # Among stop strings that complete in the new text, the earliest start wins.
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.output_text.find(s, max(0, self._check_from - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return
        idx, s = best
        self.stop_reason = s
        self.output_text = self.output_text[:idx + len(s) if self.include_stop_str_in_output
                                            else idx]
