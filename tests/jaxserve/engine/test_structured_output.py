"""Structured outputs on the random-weight demo model at temperature 1: every output of 200
random JSON schemas parses and validates (jsonschema is the oracle), regexes, choices and
grammars likewise (re.fullmatch); constrained rows leave their unconstrained neighbours'
tokens unchanged; the overlapped loop equals the synchronous one; bad input is a ValueError
naming the field with llguidance's message; a grammar that cannot finish ends by length; a
slow compile is refused while other requests go on; nothing compiles after warm-up."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from jaxserve import LLM, AsyncLLM, SamplingParams, StructuredOutputsParams
from jaxserve.outputs import merge_delta
from random_schemas import random_schemas

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
SHAPES = dict(max_num_seqs=64, max_num_batched_tokens=256, seq_buckets=(4, 16, 64), token_buckets=(32, 128, 256))
PROMPT = "Answer in JSON:"
REGEXES = [r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)", r"\d{3}-\d{4}", r"(yes|no)( maybe)?", r"#[0-9a-f]{6}",
           r"[A-Z][a-z]{0,6}( [A-Z][a-z]{0,6}){0,2}"]
CHOICES = [["red", "green", "blue"], ["Paris", "Lyon", "Nice", "a b c"], ["0", "00", "000"]]
LARK = 'start: "(" NUM ("+" NUM){0,3} ")"\nNUM: /[0-9]{1,3}/'
LARK_RE = r"\([0-9]{1,3}(\+[0-9]{1,3}){0,3}\)"
GBNF = 'root ::= "x" digit digit? ("," "x" digit)?\ndigit ::= [0-9]'
GBNF_RE = r"x[0-9][0-9]?(,x[0-9])?"
# Nested 12 deep with every level twice: llguidance takes ~0.7 s (more on a loaded machine).
SLOW_SCHEMA: dict = {"type": "integer"}
for _ in range(12):
    SLOW_SCHEMA = {"type": "object", "required": ["a"],
                   "properties": {"a": SLOW_SCHEMA, "b": {"anyOf": [SLOW_SCHEMA, {"type": "string"}]}}}


def constrained(seed: int, max_tokens: int = 200, **so) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**so))


@pytest.fixture(scope="module")
def llm():
    engine = LLM(None, config=CPU, **SHAPES)  # the demo model: random weights
    engine.warm_compiles = engine.stats()["compile_count"]
    return engine


@pytest.fixture(scope="module")
def sync_llm():
    """Synchronous loop, a small KV pool (preemption), and a compile timeout that the slow
    schema exceeds several times over."""
    engine = LLM(None, config=CPU, async_scheduling=False, structured_outputs_compile_timeout_s=0.2, num_pages=48,
                 **SHAPES)
    engine.warm_compiles = engine.stats()["compile_count"]
    return engine


def generate(llm, params: list[SamplingParams], prompt: str = PROMPT):
    return [o.outputs[0] for o in llm.generate([prompt] * len(params), params, use_tqdm=False)]


# make test runs the first 50 of the 200 (100 took 17 s of the suite's time), test-all all of them.
@pytest.mark.parametrize("quarter", [0, *(pytest.param(q, marks=pytest.mark.slow) for q in (1, 2, 3))])
def test_200_random_json_schemas_all_validate(llm, quarter):
    """Each quarter of the 200 in one generate call (its 50 rows decode together in the 64-row bucket)."""
    schemas = random_schemas(200, seed=1234)[50 * quarter:50 * (quarter + 1)]
    outs = generate(llm, [constrained(50 * quarter + i, json=s) for i, s in enumerate(schemas)])
    for schema, out in zip(schemas, outs):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)
    assert len({o.text for o in outs}) > len(outs) // 2  # sampled, not one canned answer
    assert llm.stats()["compile_count"] == llm.warm_compiles


def test_regex_choice_and_grammars_match(llm):
    cases = ([(dict(regex=r), r) for r in REGEXES] + [(dict(choice=c), "|".join(map(re.escape, c))) for c in CHOICES]
             + [(dict(grammar=LARK), LARK_RE), (dict(grammar=GBNF), GBNF_RE)])
    params, patterns = [], []
    for k, (so, pattern) in enumerate(cases):
        for seed in range(6):
            params.append(constrained(100 * k + seed, max_tokens=64, **so))
            patterns.append(pattern)
    outs = generate(llm, params)
    for pattern, out in zip(patterns, outs):
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), (pattern, out.text)
    for k, (so, _) in enumerate(cases):  # sampled: a case with many strings gets more than one
        if "regex" in so:
            assert len({o.text for o in outs[6 * k:6 * k + 6]}) > 1, so


def test_json_object_and_n_samples(llm):
    outs = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=200,
                                                 structured_outputs={"json": random_schemas(1, seed=7)[0]}),
                        use_tqdm=False)[0].outputs
    schema = random_schemas(1, seed=7)[0]
    assert len(outs) == 3
    for out in outs:
        jsonschema.validate(json.loads(out.text), schema)
    obj = generate(llm, [constrained(3, max_tokens=300, json_object=True)])[0]
    if obj.finish_reason == "stop":  # any object can be long: only a finished one must parse
        assert isinstance(json.loads(obj.text), dict)
    assert obj.text.startswith("{")


def test_constrained_rows_leave_30_others_unchanged(llm):
    plain = [SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=12 + i % 5) for i in range(30)]
    alone = generate(llm, plain)
    mixed = generate(llm, plain[:15] + [constrained(1, json=random_schemas(1, seed=3)[0])] + plain[15:]
                     + [constrained(2, regex=REGEXES[0])])
    assert [o.token_ids for o in mixed[:15] + mixed[16:31]] == [o.token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[15].text), random_schemas(1, seed=3)[0])
    assert re.fullmatch(REGEXES[0], mixed[31].text)
    assert llm.stats()["compile_count"] == llm.warm_compiles


def test_overlapped_loop_equals_synchronous_with_preemption(llm, sync_llm):
    """Matchers follow their requests through preemption and recomputation."""
    schemas = random_schemas(24, seed=99)
    params = ([constrained(i, json=s) for i, s in enumerate(schemas)]
              + [SamplingParams(temperature=1.0, seed=50 + i, max_tokens=20) for i in range(6)]
              + [constrained(7, regex=REGEXES[3]), constrained(8, choice=CHOICES[1])])
    before = sync_llm.stats()["num_preemptions"]
    a, b = generate(llm, params), generate(sync_llm, params)
    assert sync_llm.stats()["num_preemptions"] > before
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for schema, out in zip(schemas, b):
        jsonschema.validate(json.loads(out.text), schema)
    assert sync_llm.stats()["compile_count"] == sync_llm.warm_compiles


def test_grammar_that_cannot_finish_ends_by_length(llm):
    out = generate(llm, [constrained(0, max_tokens=5, regex="a{40}b")])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.text and set(out.text) == {"a"}  # the partial text, a prefix of the only answer


@pytest.mark.parametrize("so, field, message", [
    (dict(json={"type": "strnig"}), "structured_outputs.json", "strnig"),
    (dict(json={"type": "object", "properties": {"a": {"type": "string", "pattern": "(x"}}}),
     "structured_outputs.json", "regex"),
    (dict(regex="a(b"), "structured_outputs.regex", "unclosed group"),
    (dict(grammar="start: foo"), "structured_outputs.grammar", "unknown name"),
    (dict(json={"type": "array", "uniqueItems": True}), "structured_outputs.json", "uniqueItems"),
])
def test_invalid_grammars_name_the_field_and_the_engine_message(llm, so, field, message):
    with pytest.raises(ValueError, match=re.escape(field)) as e:
        llm.generate([PROMPT], constrained(0, **so), use_tqdm=False)
    assert message in str(e.value)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("so, message", [
    (dict(), "exactly one of"), (dict(json="{}", regex="a"), "exactly one of"),
    (dict(json="not json"), "structured_outputs.json must be a JSON schema"),
    (dict(choice=[]), "structured_outputs.choice must hold 1"), (dict(choice="ab"), "structured_outputs.choice"),
    (dict(regex=""), "structured_outputs.regex"), (dict(json_object="yes"), "structured_outputs.json_object"),
])
def test_malformed_structured_outputs_params(so, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StructuredOutputsParams(**so)
    with pytest.raises(ValueError, match="structured_outputs has unknown fields"):
        SamplingParams(structured_outputs={"jsn": "{}"})


def test_slow_compile_is_refused_without_blocking_others(sync_llm):
    engine = AsyncLLM(engine=sync_llm.engine)
    cached = StructuredOutputsParams(regex=REGEXES[1])
    sync_llm.engine.structured.compiled(cached)

    async def run(params: SamplingParams):
        out = None
        async for delta in engine.generate(PROMPT, params):
            out = merge_delta(out, delta)
        return out

    async def main():
        slow = asyncio.ensure_future(run(SamplingParams(max_tokens=50, structured_outputs={"json": SLOW_SCHEMA})))
        others = [run(SamplingParams(temperature=0.0, max_tokens=8)),
                  run(SamplingParams(temperature=1.0, seed=1, max_tokens=16, structured_outputs=cached))]
        done = await asyncio.gather(*others)
        with pytest.raises(ValueError, match=r"structured_outputs\.json: the grammar did not compile within 0\.2 s"):
            await slow
        return done

    try:
        plain, regex = asyncio.run(main())
    finally:
        engine.shutdown()
    assert len(plain.outputs[0].token_ids) >= 1
    out = regex.outputs[0]
    assert re.fullmatch(REGEXES[1], out.text) if out.finish_reason == "stop" else out.finish_reason == "length"


def test_mask_of_step_n_plus_1_is_filled_while_its_body_runs(llm):
    """Per constrained step: body(N+1) queued, then step N's tokens read, then the mask filled,
    then sample(N+1) queued with it; steps without constrained rows never wait."""
    engine, runner = llm.engine, llm.engine.runner
    events: list[str] = []
    originals = runner._body, runner._sample, runner.collect, engine.structured.bitmask

    def record(name, fn):
        def wrapped(*args, **kwargs):
            events.append(name)
            return fn(*args, **kwargs)
        return wrapped

    runner._body, runner._sample = record("body", originals[0]), record("sample", originals[1])
    runner.collect, engine.structured.bitmask = record("collect", originals[2]), record("mask", originals[3])
    try:
        generate(llm, [constrained(0, max_tokens=12, regex="[a-z]{10}")])
    finally:
        runner._body, runner._sample = originals[:2]  # the jitted programs are instance attributes
        del runner.collect, engine.structured.bitmask  # methods: the class's come back
    steps = "".join({"body": "B", "sample": "S", "collect": "C", "mask": "M"}[e] for e in events)
    # The first step has nothing in flight to read; in every later one the body runs while
    # step N is read and N+1 masked; the last step's tokens are read by finish_step.
    assert re.fullmatch(r"BMS(BCMS){3,}C*", steps), steps


def test_multi_host_wire_carries_structured_outputs():
    """Followers rebuild the leader's SamplingParams from the JSON broadcast, constraint included."""
    from jaxserve.engine.async_llm import _from_wire, _to_wire

    for so in (dict(json=random_schemas(1, seed=2)[0]), dict(choice=["a", "b"]),
               dict(regex="x+", disable_any_whitespace=False), dict(json_object=True)):
        params = constrained(3, **so)
        wire = json.loads(json.dumps(_to_wire(("add", "r", [1, 2], params, None, None, None))))
        assert _from_wire(wire)[3] == params


def test_tensor_and_data_parallel_meshes_give_the_same_constrained_outputs():
    here = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": f"{here.parents[1]}{os.pathsep}{here}"}
    # data=2,model=2 is both kinds at once (model=2 alone as well was one more engine to build and run)
    proc = subprocess.run([sys.executable, str(here / "structured_mesh_check.py"), CPU, "model=1",
                           "data=2,model=2"], capture_output=True, text=True, timeout=600, env=env)
    lines = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[0])
    runs = result["meshes"]
    for mesh, run in runs.items():
        assert run["texts"] == runs["model=1"]["texts"] and run["compiles"] == 0, mesh
    for schema, text in zip(result["schemas"], runs["model=1"]["texts"]):
        jsonschema.validate(json.loads(text), schema)


def test_min_tokens_is_refused_with_a_grammar(llm):
    with pytest.raises(ValueError, match="min_tokens must be 0 with structured_outputs"):
        llm.generate([PROMPT], SamplingParams(min_tokens=3, structured_outputs={"regex": "a+"}), use_tqdm=False)
    # A refused request starts no compile: one finishing later would race the next test's count.
    assert ("regex", "a+", True) not in llm.engine.structured._cache


def test_grammars_compile_once_per_text(llm):
    manager = llm.engine.structured
    schema = {"type": "object", "properties": {"zz": {"type": "boolean"}}, "required": ["zz"],
              "additionalProperties": False}
    before = manager.num_compiles
    first = manager.compiled(StructuredOutputsParams(json=schema))
    same = manager.compiled(StructuredOutputsParams(json=json.dumps(schema, indent=2)))  # same schema, other text
    assert same is first and manager.num_compiles == before + 1
    loose = manager.compiled(StructuredOutputsParams(json=schema, disable_any_whitespace=False))
    assert loose is not first and manager.num_compiles == before + 2
    outs = generate(llm, [constrained(s, json=schema) for s in range(3)])
    assert all(json.loads(o.text) in ({"zz": True}, {"zz": False}) for o in outs)
    assert manager.num_compiles == before + 2
