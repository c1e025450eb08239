import dataclasses

import numpy as np
import pytest

from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens) == (None, 16, 0)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == ((), (), False, None)
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert p.logit_bias is None
    assert not p.is_greedy and not p.needs_penalties and p.num_logprobs == 0


def test_normalisation_and_hashable():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=[3, 7],
                       logit_bias={5: 1, 2: -100.0}, temperature=1, seed=np.int64(-3))
    assert p.top_k == 0
    assert p.stop == ("###",)
    assert p.stop_token_ids == (3, 7)
    assert p.logit_bias == ((2, -100.0), (5, 1.0))
    assert p.logit_bias_dict == {2: -100.0, 5: 1.0}
    assert isinstance(p.temperature, float) and type(p.seed) is int
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()
    q = SamplingParams(top_k=0, stop=("###",), stop_token_ids=(3, 7),
                       logit_bias=[(5, 1.0), (2, -100)], temperature=1.0, seed=-3)
    assert p == q and hash(p) == hash(q)
    assert len({p, q}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


def test_replace_revalidates():
    p = SamplingParams()
    assert dataclasses.replace(p, top_k=-1).top_k == 0
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=0.0)


def test_is_greedy_and_penalties():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-7).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy
    assert SamplingParams(repetition_penalty=1.1).needs_penalties
    assert SamplingParams(presence_penalty=-0.5).needs_penalties
    assert SamplingParams(frequency_penalty=0.5).needs_penalties
    assert SamplingParams(logprobs=3).num_logprobs == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
    ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"temperature": float("nan")}, "temperature must be finite"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -2}, r"top_k must be in \[0, 2147483647\] .*got -2"),
    ({"top_k": 2.0}, "top_k must be an int, got 2.0"),
    ({"top_k": True}, "top_k must be an int, got True"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
    ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\], got -3.0"),
    ({"n": 0}, r"n must be in \[1, 2147483647\], got 0"),
    ({"n": 1.5}, "n must be an int, got 1.5"),
    ({"max_tokens": 0}, r"max_tokens must be in \[1, 2147483647\] or None, got 0"),
    ({"max_tokens": "16"}, "max_tokens must be an int"),
    ({"min_tokens": -1}, r"min_tokens must be in \[0, 2147483647\], got -1"),
    ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens must be <= max_tokens \(4\), got 5"),
    ({"logprobs": MAX_LOGPROBS + 1}, rf"logprobs must be in \[0, {MAX_LOGPROBS}\]"),
    ({"logprobs": -1}, "logprobs must be in"),
    ({"stop": ""}, "stop must be non-empty strings"),
    ({"stop": ["ok", 3]}, "stop must be non-empty strings, got 3"),
    ({"stop": 3}, "stop must be None, a str or a list of str"),
    ({"stop_token_ids": [1, -2]}, r"stop_token_ids must be token ids in \[0, 2147483647\], got -2"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids must be an int"),
    ({"stop_token_ids": 5}, "stop_token_ids must be a list of int"),
    ({"seed": 1.0}, "seed must be an int, got 1.0"),
    ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1"),
    ({"skip_special_tokens": None}, "skip_special_tokens must be a bool"),
    ({"logit_bias": {1: 101.0}}, r"logit_bias value must be in \[-100, 100\], got 101.0"),
    ({"logit_bias": {-1: 1.0}}, r"logit_bias key must be a token id in \[0, 2147483647\], got -1"),
    ({"logit_bias": {"7": 1.0}}, "logit_bias key must be an int, got '7'"),
    ({"logit_bias": {1: float("-inf")}}, "logit_bias value must be finite"),
    ({"logit_bias": [1, 2]}, "logit_bias must be a dict"),
    # Bounded to what the engine's fixed-width arrays hold (int32 / float32 / 64-bit seeds).
    ({"top_k": 2**31}, r"top_k must be in \[0, 2147483647\]"),
    ({"n": 2**31}, r"n must be in \[1, 2147483647\]"),
    ({"max_tokens": 2**63}, r"max_tokens must be in \[1, 2147483647\]"),
    ({"min_tokens": 2**31, "max_tokens": None}, r"min_tokens must be in \[0, 2147483647\]"),
    ({"logprobs": 2**63}, r"logprobs must be in \[0, 20\]"),
    ({"stop_token_ids": [2**31]}, r"stop_token_ids must be token ids in \[0, 2147483647\], got 2147483648"),
    ({"logit_bias": {2**31: 1.0}}, r"logit_bias key must be a token id in \[0, 2147483647\]"),
    ({"seed": 2**64}, r"seed must be in \[-2\*\*63, 2\*\*64 - 1\]"),
    ({"seed": -(2**63) - 1}, r"seed must be in \[-2\*\*63"),
    ({"temperature": 1e39}, "temperature must be within the float32 range"),
    ({"temperature": 10**400}, "temperature must be finite"),
    ({"top_p": float("inf")}, "top_p must be finite"),
    ({"min_p": float("nan")}, "min_p must be finite"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be finite"),
    ({"presence_penalty": float("-inf")}, "presence_penalty must be finite"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be finite"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias value must be finite"),
])
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_boundaries_accepted():
    SamplingParams(temperature=0, top_p=1, min_p=1, presence_penalty=-2, frequency_penalty=2,
                   logprobs=0, max_tokens=None, min_tokens=100, seed=2**40,
                   logit_bias={0: -100, 1: 100})
    SamplingParams(logprobs=MAX_LOGPROBS, min_tokens=3, max_tokens=3)
    SamplingParams(n=2**31 - 1, top_k=2**31 - 1, max_tokens=2**31 - 1, min_tokens=2**31 - 1,
                   stop_token_ids=[2**31 - 1], logit_bias={2**31 - 1: 1.0}, temperature=3e38)
    for seed in (-(2**63), 2**64 - 1, 0):
        assert SamplingParams(seed=seed).seed == seed


def test_validate_for_model():
    p = SamplingParams(stop_token_ids=[9], logit_bias={3: 1.0})
    p.validate_for_model(vocab_size=10)
    with pytest.raises(ValueError, match=r"stop_token_ids must be < vocab_size \(9\), got 9"):
        p.validate_for_model(vocab_size=9)
    with pytest.raises(ValueError, match=r"logit_bias key must be < vocab_size \(3\), got 3"):
        SamplingParams(logit_bias={3: 1.0}).validate_for_model(vocab_size=3)
    SamplingParams(top_k=10).validate_for_model(vocab_size=10)  # the whole vocabulary, as vLLM
    with pytest.raises(ValueError, match=r"top_k must be <= vocab_size \(10\)"):
        SamplingParams(top_k=11).validate_for_model(vocab_size=10)


def test_stop_strings_are_bounded_in_number_and_length():
    from jaxserve.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

    assert len(SamplingParams(stop=["x"] * MAX_STOP_STRINGS).stop) == MAX_STOP_STRINGS
    with pytest.raises(ValueError, match=f"stop must hold at most {MAX_STOP_STRINGS} strings, got"):
        SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1))
    with pytest.raises(ValueError, match="stop strings must be at most"):
        SamplingParams(stop=["x" * (MAX_STOP_STRING_CHARS + 1)])
