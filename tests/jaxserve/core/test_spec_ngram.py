"""N-gram proposer against a per-sequence pure-Python oracle."""

import numpy as np
import pytest

from jaxserve.core.spec_ngram import pad_sequences, propose_ngram


def oracle(seq, k, n_min, n_max, wrap=False):
    L = len(seq)
    for n in range(n_max, n_min - 1, -1):
        if L <= n:
            continue
        suf = seq[L - n:]
        for i in range(L - n - 1, -1, -1):  # latest earlier occurrence with a following token
            if seq[i:i + n] == suf:
                if wrap:  # the text repeats with period L - (i + n)
                    return [seq[i + n + j % (L - i - n)] for j in range(k)]
                return seq[i + n:i + n + k]
    return []


def test_examples():
    toks, lens = pad_sequences([[1, 2, 3, 4, 1, 2], [5, 6, 7], [9, 9, 9, 9], [3]])
    props, num = propose_ngram(toks, lens, k=3, n_min=1, n_max=2)
    assert num.tolist() == [3, 0, 1, 0]  # [9, 9, 9, 9]: the latest earlier [9, 9] is followed by one token
    assert props[0].tolist() == [3, 4, 1] and props[2].tolist() == [9, -1, -1]
    props, num = propose_ngram(toks, lens, k=3, n_min=1, n_max=2, wrap=True)
    assert num.tolist() == [3, 0, 3, 0] and props[2].tolist() == [9, 9, 9]
    toks, lens = pad_sequences([[7, 1, 2, 1, 2, 1]])  # [2 1] matched 2 back: period 2
    assert propose_ngram(toks, lens, k=5, n_min=1, n_max=2, wrap=True)[0][0].tolist() == [2, 1, 2, 1, 2]


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("k,n_min,n_max", [(1, 1, 1), (3, 1, 3), (5, 2, 4)])
def test_random_against_oracle(k, n_min, n_max, wrap):
    rng = np.random.default_rng(k * 10 + n_max)
    seqs = [rng.integers(0, 4, size=int(rng.integers(1, 40))).tolist() for _ in range(300)]
    toks, lens = pad_sequences(seqs)
    props, num = propose_ngram(toks, lens, k=k, n_min=n_min, n_max=n_max, wrap=wrap)
    for b, s in enumerate(seqs):
        want = oracle(s, k, n_min, n_max, wrap)
        assert num[b] == len(want) and props[b, :num[b]].tolist() == want, (s, props[b], num[b])
        assert (props[b, num[b]:] == -1).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_min"):
        propose_ngram(np.zeros((1, 4), np.int32), np.array([4]), k=2, n_min=3, n_max=2)
