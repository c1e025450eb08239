"""SpeculativeConfig: vLLM's speculative_config shape, validated; EngineConfig, YAML and JSON forms."""

import pytest
import yaml

from jaxserve.config import EngineConfig
from jaxserve.speculative import SpeculativeConfig


def test_defaults_off():
    assert EngineConfig().speculative_config is None


def test_mapping_json_and_yaml_forms_agree(tmp_path):
    want = SpeculativeConfig(method="ngram", num_speculative_tokens=5, prompt_lookup_min=2, prompt_lookup_max=4)
    d = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    assert EngineConfig(speculative_config=d).speculative_config == want
    assert EngineConfig.load(speculative_config='{"method": "ngram", "num_speculative_tokens": 5, '
                             '"prompt_lookup_min": 2, "prompt_lookup_max": 4}').speculative_config == want
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"engine": {"speculative_config": d}}))
    assert EngineConfig.load(str(p)).speculative_config == want
    draft = EngineConfig(speculative_config={"method": "draft_model", "model": "/d", "dtype": "bfloat16"})
    assert draft.speculative_config.model == "/d" and draft.speculative_config.dtype == "bfloat16"


@pytest.mark.parametrize("bad, field", [
    ({"method": "eagle"}, "method"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 17}, "num_speculative_tokens"),
    ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"method": "draft_model"}, "model"),
    ({"method": "ngram", "model": "/d"}, "model"),
    ({"dtype": "int4"}, "dtype"),
    ({"k": 3}, "unknown keys"),
    ("{not json", "JSON"),
    (3, "mapping"),
])
def test_bad_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(speculative_config=bad)


def test_engine_refuses_a_draft_model_it_cannot_find():
    from jaxserve.engine.llm_engine import LLMEngine

    with pytest.raises((ValueError, OSError), match="/no/such/draft"):
        LLMEngine(EngineConfig(speculative_config={"method": "draft_model", "model": "/no/such/draft"}))
