"""Incremental detokenization with stop strings, one request at a time.

Per new token (vLLM's detokenize_incrementally, on ids instead of token strings), ONE
decode of a short window of ids:

    window = ids from prefix_offset; read = read_offset inside the window
    prefix_text = decode(window[:read]), cached from an earlier step (never decoded twice)
    new_text = decode(window)
    if new_text is longer than prefix_text and does not end in U+FFFD:
        delta = new_text[len(prefix_text):]; read_offset = end; prefix_text = new_text
        once the window holds more than MAX_PREFIX_TOKENS read ids, it slides:
        prefix_offset = the old read_offset, and prefix_text = decode of the new window
        (one extra decode every few tokens)
    else: hold the token (an incomplete UTF-8 character, or a skipped special token)

Decoding a window that starts a few tokens back keeps context-dependent decoders right
(SentencePiece strips the leading space of the first token it decodes; byte-level BPE
needs every byte of a character), while each step decodes only a handful of tokens.
Invalid byte runs are the exception: a full decode may turn them into a different number
of U+FFFD than any stream that never takes text back can (see the tests).

Everything per token is bounded, so a stream of n tokens costs O(n): the text is kept as
chunks (joined only when `output_text` is read), and stop strings are searched in the new
text only (plus the len(stop) - 1 characters before it, kept as a short tail). While
streaming, the last max(len(stop)) - 1 characters are held back, because they could be the
start of a stop string (vLLM v1); `flush()` releases them at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

# Prompt tokens decoded as context before the first output token (vLLM uses 5).
PROMPT_CONTEXT_TOKENS = 5
# Read ids the window may keep before it slides (then it keeps only the ids read last).
# Larger: fewer slides (each costs one decode) but longer windows to decode every step.
MAX_PREFIX_TOKENS = 3
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
        includes the held-back tail that `append` has not returned yet). A property that
        joins the text chunks when read: O(len) per read, nothing per token.
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
        # Characters before the new text that a stop string completing in it can start in.
        self._tail_length = max(map(len, self.stop)) - 1 if self.stop else 0
        self.stop_buffer_length = 0 if include_stop_str_in_output else self._tail_length
        self._decode = _decoder(tokenizer, skip_special_tokens)
        self._skipped_ids = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        prompt = [int(t) for t in prompt_token_ids if int(t) not in self._skipped_ids]
        self._window = prompt[-PROMPT_CONTEXT_TOKENS:]  # ids from prefix_offset on
        self._read = len(self._window)
        # A prompt ending inside a character decodes to one trailing U+FFFD; drop it, so
        # that once output tokens complete the character it is emitted as output.
        self._prefix_text = self._decode(self._window)  # decode(window[:read])
        if self._prefix_text.endswith(_REPLACEMENT_CHAR):
            self._prefix_text = self._prefix_text[:-1]
        self.token_ids: list[int] = []
        self.stop_reason: str | None = None
        # output_text = "".join(_returned_chunks) + "".join(_pending)
        self._returned_chunks: list[str] = []  # text handed out by append / flush
        self._pending: list[str] = []  # text not handed out yet (held tail, new deltas)
        self._pending_length = 0
        self._tail = ""  # the last _tail_length characters of output_text

    @property
    def finished(self) -> bool:
        """True once a stop string matched; later tokens are ignored."""
        return self.stop_reason is not None

    @property
    def output_text(self) -> str:
        if len(self._returned_chunks) > 1:  # compact, so repeated reads do not re-join
            self._returned_chunks[:] = ["".join(self._returned_chunks)]
        return "".join(self._returned_chunks + self._pending)

    def append(self, new_token_ids: Iterable[int]) -> str:
        """Consume new output ids; return the text that is now safe to stream."""
        for token_id in new_token_ids:
            if self.finished:
                break
            self.token_ids.append(int(token_id))
            self._add_text(self._decode_next(int(token_id)))
        return self._take(0 if self.finished else self.stop_buffer_length)

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
        return self._take(0)

    def _take(self, held: int) -> str:
        """Hand out the pending text but its last `held` characters."""
        if self._pending_length <= held:
            return ""
        pending = "".join(self._pending)
        end = len(pending) - held
        delta, rest = pending[:end], pending[end:]
        self._pending, self._pending_length = [rest] if rest else [], len(rest)
        self._returned_chunks.append(delta)
        return delta

    def _decode_next(self, token_id: int) -> str:
        if token_id in self._skipped_ids:
            return ""  # decodes to nothing; keeping it out of the window keeps it short
        self._window.append(token_id)
        new_text = self._decode(self._window)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""  # incomplete character: wait for the bytes that complete it
        delta = new_text[len(self._prefix_text):]
        if len(self._window) > MAX_PREFIX_TOKENS:  # slide: keep the ids read just now
            self._window = self._window[self._read:]
            self._prefix_text = self._decode(self._window)
        else:
            self._prefix_text = new_text
        self._read = len(self._window)
        return delta

    def _add_text(self, delta: str) -> None:
        if not delta:
            return
        self._pending.append(delta)
        self._pending_length += len(delta)
        if not self.stop:
            return
        text = self._tail + delta  # all a stop string completing in delta can touch
        if len(self.token_ids) > self.min_tokens:
            cut = self._find_stop(text, len(self._tail))
            if cut is not None:  # drop the text after the cut (all of it pending)
                drop = len(text) - cut
                pending = "".join(self._pending)
                pending = pending[:len(pending) - drop]
                self._pending, self._pending_length = [pending] if pending else [], len(pending)
                return
        self._tail = text[-self._tail_length:] if self._tail_length else ""

    def _find_stop(self, text: str, new_from: int) -> int | None:
        """Where output_text ends after a stop string completing in text[new_from:], if any.

        Among stop strings that complete in the new text, the earliest start wins.
        """
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = text.find(s, max(0, new_from - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.stop_reason = s
        return idx + len(s) if self.include_stop_str_in_output else idx
