"""Input processing: a user's prompt and SamplingParams -> validated token ids and limits.

Every check names the field and the limit (ValueError), before anything reaches the
scheduler or a fixed-width device array.
"""

from __future__ import annotations

import numpy as np

from jaxserve.sampling_params import SamplingParams
from jaxserve.worker.input_batch import MAX_BIAS_ENTRIES

# A string prompt longer than max_model_len * this many characters cannot fit the context,
# whatever it tokenizes to, and is refused before the tokenizer sees it (tokenizing 1 MB
# takes seconds). The factor is the vocabulary's longest token (in characters; a byte-level
# token has one character per byte, so the text is never longer), doubled for normalisers
# that shrink the text, and at least MIN_CHARS_PER_TOKEN.
MIN_CHARS_PER_TOKEN = 16


def max_chars_per_token(tokenizer) -> int:
    """An upper bound on the characters of text one token stands for (see above)."""
    try:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: the floor only
        longest = 0
    return max(MIN_CHARS_PER_TOKEN, 2 * longest)


class InputProcessor:
    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int, max_logprobs: int, max_num_seqs: int,
                 page_size: int, num_total_pages: int, eos_token_ids: frozenset[int],
                 sliding_window: int | None = None, max_num_batched_tokens: int | None = None,
                 prompt_logprobs: bool = True):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.max_num_seqs = max_num_seqs
        self.page_size = page_size
        self.num_total_pages = num_total_pages
        # With a window whose pages slide out (KVCacheManager(sliding_window=W)), a sequence holds at most
        # the window's pages, the pages of one prefill chunk and a partial page at each end.
        self.window_pages = None
        if sliding_window is not None:
            chunk = max_num_batched_tokens or max_model_len
            self.window_pages = -(-sliding_window // page_size) + -(-chunk // page_size) + 2
        self.eos_token_ids = eos_token_ids
        self.prompt_logprobs = prompt_logprobs  # EngineConfig.enable_prompt_logprobs
        self.max_prompt_chars = max_model_len * max_chars_per_token(tokenizer)

    def process(self, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int], int]:
        """(prompt text or None, prompt token ids, max_tokens resolved against the context)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize(prompt)
        return text, ids, self.check(ids, params)

    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        vocab = self.vocab_size
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if len(prompt) > self.max_prompt_chars:
                raise ValueError(f"prompt has {len(prompt)} characters, more than any prompt that fits "
                                 f"max_model_len ({self.max_model_len} tokens) can have: at most "
                                 f"{self.max_prompt_chars} characters")
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt_token_ids must not be empty")
        bad = [int(t) for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids must be in [0, {vocab}) (the vocabulary), got {bad[0]}")
        return None, [int(t) for t in prompt]

    def check(self, ids: list[int], params: SamplingParams) -> int:
        n_prompt, limit = len(ids), self.max_model_len
        if n_prompt >= limit:
            raise ValueError(f"prompt has {n_prompt} tokens; max_model_len is {limit}, so at most "
                             f"{limit - 1} prompt tokens leave room for one generated token")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise ValueError(f"max_tokens {max_tokens} does not fit: the prompt has {n_prompt} tokens and "
                             f"max_model_len is {limit}, so max_tokens must be <= {limit - n_prompt}")
        if params.min_tokens > max_tokens:
            raise ValueError(f"min_tokens {params.min_tokens} is more than max_tokens ({max_tokens}, after the "
                             f"{n_prompt} prompt tokens within max_model_len {limit})")
        params.validate_for_model(vocab_size=self.vocab_size)
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(f"logprobs must be <= {self.max_logprobs} (max_logprobs), got {params.logprobs}")
        if params.prompt_logprobs is not None and not self.prompt_logprobs:
            raise ValueError("prompt_logprobs needs an engine started with enable_prompt_logprobs "
                             "(--enable-prompt-logprobs) and without speculative_config; this one compiled no "
                             "prompt-logprob programs")
        if params.prompt_logprobs is not None and params.prompt_logprobs > self.max_logprobs:
            raise ValueError(f"prompt_logprobs must be <= {self.max_logprobs} (max_logprobs), "
                             f"got {params.prompt_logprobs}")
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        bias = len(params.logit_bias or ()) + (len(banned) if params.min_tokens else 0)
        if bias > MAX_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has too many entries: with the tokens min_tokens bans at most "
                             f"{MAX_BIAS_ENTRIES - len(banned)}")
        if params.n > self.max_num_seqs:
            raise ValueError(f"n must be <= {self.max_num_seqs} (max_num_seqs), got {params.n}")
        page = self.page_size
        pages = -(-n_prompt // page) + params.n * (-(-max_tokens // page) + 1)
        if self.window_pages is not None:
            pages = min(pages, params.n * self.window_pages)
        if pages > self.num_total_pages:
            raise ValueError(f"max_tokens {max_tokens} with n={params.n} needs up to {pages} KV pages, more than "
                             f"the {self.num_total_pages} of the cache (num_pages); lower max_tokens or n")
        return max_tokens
