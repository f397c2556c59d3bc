"""The runner under grammars, with the default model: masks, preemption, mixed batches."""

from __future__ import annotations

import json
import re

import jsonschema

from model_runner.sampling_params import GrammarSpec, SamplingParams
from tests.model_runner.driver import GREEDY, Driver, DriverSeq

DATE = GrammarSpec(kind="regex", spec=r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-2]\d")
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
}


def constrained(spec: GrammarSpec, **params) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=64, grammar=spec, **params)


def test_a_regex_grammar_holds_and_ends_the_sequence(runner, hf_tokenizer, reference_cases):
    prompt = reference_cases[0][0]
    driver = Driver(runner)
    seq = DriverSeq("date", list(prompt), constrained(DATE))
    driver.run([seq])
    assert seq.tokens[-1] in runner.eos_token_ids
    text = hf_tokenizer.decode(seq.tokens[:-1])
    assert re.fullmatch(DATE.spec, text), text


def test_a_preempted_grammar_sequence_replays_its_tokens(runner, reference_cases):
    spec = GrammarSpec(kind="json_schema", spec=json.dumps(PERSON))
    prompt = reference_cases[1][0]
    alone = Driver(runner).run([DriverSeq("p", list(prompt), constrained(spec))])[0]
    driver = Driver(runner)
    seq = DriverSeq("p", list(prompt), constrained(spec))
    while len(seq.tokens) < 6:
        driver.step([seq])
    driver.preempt(seq)
    driver.run([seq])
    assert seq.tokens == alone


def test_plain_greedy_rows_are_unchanged_beside_grammar_rows(runner, hf_tokenizer, reference_cases):
    spec = GrammarSpec(kind="json_schema", spec=json.dumps(PERSON))
    cases = reference_cases[:3]
    seqs = []
    for i, (ids, _) in enumerate(cases):
        seqs.append(DriverSeq(f"plain{i}", list(ids), GREEDY))
        seqs.append(DriverSeq(f"json{i}", list(ids), constrained(spec)))
    Driver(runner).run(seqs)
    for i, (_, reference) in enumerate(cases):
        assert seqs[2 * i].tokens == reference
        answer = seqs[2 * i + 1].tokens
        assert answer[-1] in runner.eos_token_ids
        jsonschema.validate(json.loads(hf_tokenizer.decode(answer[:-1])), PERSON)
