"""StepShapes: the one list of device shapes a step can have, read by the scheduler (what it
may produce) and by warm-up (what it compiles), so the two cannot drift apart.

A step is two programs, each keyed by one bucket:

    body   (tokens bucket T)   the decoder over T flat tokens of at most seqs(T) sequences
    sample (rows bucket R)     LM head + sampler over R sample rows (one per sequence that
                               samples; n rows for the last prefill chunk of an n > 1 request)

Rows never exceed max_num_seqs (every sample holds a sequence slot, an unforked n > 1
request holds n) and sequences never exceed tokens, so any (tokens, rows) pair a scheduler
within its budget produces maps onto one body and one sample program: len(T) + len(R)
programs instead of len(T) x len(R) pairs.
"""

from __future__ import annotations

import bisect
import dataclasses


def pick_bucket(buckets: tuple[int, ...], n: int) -> int:
    """Smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclasses.dataclass(frozen=True)
class StepShapes:
    token_buckets: tuple[int, ...]  # sorted; the last is max_num_batched_tokens
    row_buckets: tuple[int, ...]  # sorted; the last is max_num_seqs
    max_num_seqs: int

    def __post_init__(self) -> None:
        for name in ("token_buckets", "row_buckets"):
            b = getattr(self, name)
            if not b or list(b) != sorted(set(b)) or b[0] <= 0:
                raise ValueError(f"{name} must be sorted distinct positive integers, got {b}")
        if self.row_buckets[-1] != self.max_num_seqs:
            raise ValueError(f"the largest row bucket must be max_num_seqs={self.max_num_seqs}, "
                             f"got {self.row_buckets[-1]}")

    @property
    def max_num_tokens(self) -> int:
        return self.token_buckets[-1]

    def tokens(self, num_tokens: int) -> int:
        return pick_bucket(self.token_buckets, num_tokens)

    def rows(self, num_rows: int) -> int:
        return pick_bucket(self.row_buckets, max(num_rows, 1))

    def seqs(self, token_bucket: int) -> int:
        """Padded sequence count of a body program: a sequence has at least one token."""
        return min(token_bucket, self.max_num_seqs)

    def check(self, num_tokens: int, num_seqs: int, num_rows: int) -> tuple[int, int]:
        """(T, R) buckets of a step; raises AssertionError for a step outside the set."""
        if not (0 < num_tokens <= self.max_num_tokens and num_seqs <= num_tokens
                and num_seqs <= self.max_num_seqs and num_rows <= self.max_num_seqs):
            raise AssertionError(f"step of {num_tokens} tokens, {num_seqs} sequences, {num_rows} rows is outside "
                                 f"the compiled shapes (tokens <= {self.max_num_tokens}, "
                                 f"sequences and rows <= {self.max_num_seqs})")
        return self.tokens(num_tokens), self.rows(num_rows)

    def programs(self) -> list[tuple[str, int]]:
        """Every step program warm-up compiles: ("body", T) and ("sample", R)."""
        return [("body", t) for t in self.token_buckets] + [("sample", r) for r in self.row_buckets]
