"""N-gram (prompt lookup) proposer on the host, vectorised over sequences with numpy.

For each sequence, the longest suffix of n tokens (prompt_lookup_max >= n >= prompt_lookup_min) that
also occurs earlier in the sequence is matched at its LATEST earlier occurrence, and up to k tokens that
followed it there are proposed. The loop runs over n (a few values), never over tokens or sequences.

With `wrap`, a continuation that runs into the end of the sequence goes on periodically: a match
d tokens back means the text repeats with period d, so the token after the end is the one d back
(a cycle [a b a b] proposes [a b a b ...] up to k instead of stopping after one token).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def pad_sequences(seqs: list[np.ndarray] | list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token lists -> tokens [B, L] int32 (padded with -1) and lengths [B] int32."""
    lens = np.array([len(s) for s in seqs], np.int32)
    out = np.full((len(seqs), max(int(lens.max(initial=0)), 1)), -1, np.int32)
    for b, s in enumerate(seqs):  # one copy per sequence
        out[b, :lens[b]] = s
    return out, lens


def propose_ngram(tokens: np.ndarray, lens: np.ndarray, *, k: int, n_min: int, n_max: int, wrap: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """tokens [B, L] int32 (entries at or past lens[b] are ignored), lens [B] ->
    proposals [B, k] int32 (-1 past num), num [B] int32 in [0, k] (0: no match)."""
    if k <= 0 or not 1 <= n_min <= n_max:
        raise ValueError(f"propose_ngram: need k > 0 and 1 <= n_min <= n_max, got k={k}, n_min={n_min}, n_max={n_max}")
    B, L = tokens.shape
    lens = np.asarray(lens, np.int64)
    rows = np.arange(B)
    best_start = np.full(B, -1, np.int64)  # start of the continuation (match position + n); -1: none yet
    for n in range(n_max, n_min - 1, -1):
        if L <= n:
            continue
        todo = (best_start < 0) & (lens > n)
        if not todo.any():
            continue
        suffix_idx = lens[:, None] - n + np.arange(n)[None, :]  # [B, n]
        suffix = tokens[rows[:, None], np.clip(suffix_idx, 0, L - 1)]  # [B, n]
        windows = sliding_window_view(tokens, n, axis=1)  # [B, L-n+1, n]
        match = (windows == suffix[:, None, :]).all(-1)  # [B, L-n+1]
        starts = np.arange(L - n + 1)[None, :]
        match &= starts + n < lens[:, None]  # an earlier occurrence with >= 1 following token
        has = match.any(-1) & todo
        last = (L - n) - np.argmax(match[:, ::-1], axis=-1)  # latest matching start
        best_start = np.where(has, last + n, best_start)
    idx = best_start[:, None] + np.arange(k)[None, :]  # [B, k]
    if wrap:  # period d = len - best_start: position i >= len reads best_start + (i - best_start) % d
        period = np.maximum(lens - best_start, 1)[:, None]
        idx = np.where(idx >= lens[:, None], best_start[:, None] + (idx - best_start[:, None]) % period, idx)
    ok = (best_start[:, None] >= 0) & (idx < lens[:, None])
    props = np.where(ok, tokens[rows[:, None], np.clip(idx, 0, L - 1)], -1).astype(np.int32)
    return props, ok.sum(-1).astype(np.int32)
