"""Per-request sampling parameters, shared by every room from the API down to the sampler."""

from __future__ import annotations

import msgspec

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")


class GrammarSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A structured-output constraint, compiled by the engine (xgrammar) into a token mask.

    `kind` is one of GRAMMAR_KINDS; `spec` is its text: a JSON schema, a regex, an EBNF
    grammar or an xgrammar structural tag (JSON); empty for `json_object`. With `strict`, a
    JSON schema admits no properties beyond the declared ones. NOTE: the struct is its own
    cache key (frozen, hashable): equal specs share one compiled grammar.
    """

    kind: str
    spec: str = ""
    strict: bool = True


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How to pick tokens and when to stop; field names and defaults follow vLLM.

    Validation of user input happens in the API before a request is accepted
    (`api.validation`); here the values are trusted.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per output token; 0 = sampled only
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None  # structured output: only tokens the grammar allows

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )
