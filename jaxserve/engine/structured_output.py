"""Structured outputs: grammars compiled off the engine thread and cached, one matcher per
request, and the packed token bitmask of each step's constrained rows.

The grammar engine is llguidance (measured against xgrammar in BENCHMARKS.md, "Structured
outputs"; scripts/bench_structured_output.py): it refuses JSON-schema keywords it does not
implement with an error that names them (a 400), where xgrammar 0.2.9 silently ignored
uniqueItems, propertyNames, allOf and if/then and let raw control characters into JSON
strings; its compile is lazy (well under a millisecond for the test schemas) and its mask
takes ~10-20 us a row on the demo vocabulary, computed in parallel over rows in Rust.

Where the threads meet:

    caller (event loop / LLM.generate)   compile pool (threads)      engine thread
    ----------------------------------   ----------------------      -------------
    submit(params) ------------------->  compile(): grammar, a
                                         matcher, its first mask
    await / wait the Future (timeout) <- CompiledGrammar, or a
      timeout or an error: ValueError     ValueError naming the field
    add_request --------------------------------------------------->  compiled(params): cached
                                                                      each step with constrained
                                                                      rows (see LLMEngine):
                                                                        body(N+1) queued; step N's
                                                                        tokens applied; bitmask()
                                                                        for N+1 while the body runs;
                                                                        sample(N+1, bitmask)

A request's matcher is created from its grammar the first time a mask is needed and is kept
in step with the request's output tokens lazily (every output token it has not consumed yet
is fed before the mask is filled), so preemption, recomputation and the samples forked from
an n > 1 request need nothing special: each Request object gets its own matcher.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Sequence

import numpy as np

from jaxserve.core.request import Request
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams

log = logging.getLogger(__name__)

DEFAULT_COMPILE_TIMEOUT_S = 10.0
MAX_CACHED_GRAMMARS = 1024  # compiled grammars kept (least recently used evicted)
_JSON_SEPARATORS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a packed bitmask: ceil(vocab / 32)."""
    return -(-vocab_size // 32)


@dataclasses.dataclass(frozen=True)
class CompiledGrammar:
    """A checked grammar: `template` is a fresh matcher every request's matcher copies."""

    key: tuple[str, str, bool]
    grammar: str  # llguidance's grammar text
    template: object  # llguidance.LLMatcher, never advanced
    seconds: float  # compile time


class _RequestMatcher:
    """One request's matcher and how many of its output tokens it has consumed."""

    __slots__ = ("matcher", "consumed", "failed")

    def __init__(self, matcher):
        self.matcher = matcher
        self.consumed = 0
        self.failed = False


class StructuredOutputManager:
    """Compiles and caches grammars (in its own threads) and fills bitmasks (engine thread)."""

    def __init__(self, tokenizer, *, vocab_size: int, eos_token_ids: Sequence[int],
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S, compile_threads: int = 2,
                 mask_threads: int = 2):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.compile_timeout_s = compile_timeout_s
        self.words = bitmask_words(vocab_size)
        self._pool = concurrent.futures.ThreadPoolExecutor(compile_threads, thread_name_prefix="jaxserve-grammar")
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple, concurrent.futures.Future] = collections.OrderedDict()
        self._ll_tokenizer = None
        self._mask_threads = mask_threads
        self._executor = None
        self._matchers: weakref.WeakKeyDictionary[Request, _RequestMatcher] = weakref.WeakKeyDictionary()
        self._eos_row = np.zeros(self.words, np.int32)  # EOS only: the row of a stopped or failed matcher
        for t in self.eos_token_ids:
            if t < vocab_size:
                self._eos_row[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
        self.num_compiles = 0
        self.mask_seconds = 0.0  # host time filling bitmasks, since start
        self.mask_calls = 0
        self.mask_rows = 0

    # -- compilation (any thread) -----------------------------------------------------

    def submit(self, so: StructuredOutputsParams) -> concurrent.futures.Future:
        """The Future of `so`'s CompiledGrammar: cached by (kind, text, whitespace), so a
        schema compiles once; an invalid one fails with a ValueError naming the field."""
        key = (so.kind, so.spec, so.disable_any_whitespace)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, key)
            self._cache[key] = future
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
            return future

    def compiled(self, so: StructuredOutputsParams, timeout: float | None = None) -> CompiledGrammar:
        """Waits (at most the compile timeout) for `so`'s grammar. Raises ValueError naming the
        field when it is invalid or takes longer; the compile goes on in its thread and a
        later request with the same grammar finds it in the cache."""
        timeout = self.compile_timeout_s if timeout is None else timeout
        try:
            return self.submit(so).result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise self.timeout_error(so) from None

    def timeout_error(self, so: StructuredOutputsParams) -> ValueError:
        return ValueError(f"structured_outputs.{so.kind}: the grammar did not compile within "
                          f"{self.compile_timeout_s:g} s (structured_outputs_compile_timeout_s); simplify it")

    def _tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                                   eos_token=self.eos_token_ids)
            return self._ll_tokenizer

    def _compile(self, key: tuple[str, str, bool]) -> CompiledGrammar:
        import llguidance
        import llguidance.numpy as llnp

        kind, spec, compact = key
        start = time.perf_counter()
        field = f"structured_outputs.{kind}"
        tokenizer = self._tokenizer()  # its failure is the server's, not the request's
        try:
            if kind in ("json", "json_object"):
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    spec, defaults=_JSON_SEPARATORS if compact else {"whitespace_flexible": True})
            else:
                grammar = llguidance.grammar_from({"regex": "regex", "choice": "choice"}.get(kind, "grammar"), spec)
            matcher = llguidance.LLMatcher(tokenizer, grammar)
            if not matcher.is_error():  # the first mask builds the lexer: errors of the grammar show here
                llnp.fill_next_token_bitmask(matcher, llnp.allocate_token_bitmask(1, self.vocab_size), 0)
        except Exception as e:  # noqa: BLE001 - whatever the engine says of this grammar is the caller's 400
            raise ValueError(f"{field} is invalid: {_first_lines(str(e))}") from None
        if matcher.is_error():
            raise ValueError(f"{field} is invalid: {_first_lines(matcher.get_error())}")
        with self._lock:
            self.num_compiles += 1
        return CompiledGrammar(key, grammar, matcher, time.perf_counter() - start)

    # -- bitmasks (engine thread) -----------------------------------------------------

    def check(self, params: SamplingParams) -> None:
        """Raises the compile's ValueError (or its timeout) for a request about to be added."""
        if params.structured_outputs is None:
            return
        if params.min_tokens:
            # The grammar decides where the output ends: a ban on EOS after it ended would
            # leave no token allowed.
            raise ValueError(f"min_tokens must be 0 with structured_outputs, got {params.min_tokens}")
        self.compiled(params.structured_outputs)

    def bitmask(self, rows: Sequence[Request | None], num_rows: int) -> np.ndarray:
        """int32[num_rows, words]: row i allows what rows[i]'s grammar allows next (all bits
        set for unconstrained, finished or padding rows). Rows of one request share a mask."""
        import llguidance.numpy as llnp

        start = time.perf_counter()
        mask = np.full((num_rows, self.words), -1, np.int32)
        first_row: dict[int, int] = {}  # id(request) -> its first row
        copies: list[tuple[int, int]] = []
        pairs = []
        for i, req in enumerate(rows):
            if req is None or req.params.structured_outputs is None or req.is_finished:
                continue
            j = first_row.setdefault(id(req), i)
            if j != i:
                copies.append((i, j))
                continue
            try:
                state = self._sync(req)
            except Exception:  # noqa: BLE001 - one request's grammar must not stop the engine
                log.exception("request %s: its grammar failed; the request is ended with EOS", req.request_id)
                mask[i] = self._eos_row
                continue
            if state.failed or state.matcher.is_stopped():
                mask[i] = self._eos_row
            else:
                pairs.append((state.matcher, i))
        if pairs:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor(self._mask_threads)
            llnp.fill_next_token_bitmask_par(self._executor, pairs, mask)
        for i, j in copies:
            mask[i] = mask[j]
        self.mask_seconds += time.perf_counter() - start
        self.mask_calls += 1
        self.mask_rows += len(pairs)
        return mask

    def _sync(self, req: Request) -> _RequestMatcher:
        """The request's matcher, fed every output token it has not consumed yet."""
        state = self._matchers.get(req)
        if state is None:
            grammar = self.compiled(req.params.structured_outputs)
            state = self._matchers[req] = _RequestMatcher(grammar.template.deep_copy())
        new = req.token_ids[req.num_prompt_tokens + state.consumed:]
        if new and not state.failed and not state.matcher.is_stopped():
            if not state.matcher.consume_tokens(new) or state.matcher.is_error():
                # Only a token the mask did not allow gets here (nothing the engine samples):
                # the request is ended with EOS rather than sampled without its grammar.
                log.warning("request %s: its grammar refused an output token: %s", req.request_id,
                            _first_lines(state.matcher.get_error()))
                state.failed = True
        state.consumed += len(new)
        return state

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _first_lines(text: str, n: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[:n])


def needs_bitmask(rows: Sequence[Request]) -> bool:
    """True when some row of a step is constrained."""
    return any(r.params.structured_outputs is not None for r in rows)
