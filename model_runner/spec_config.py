"""Speculative decoding's settings: vLLM's `--speculative-config` JSON, checked at start-up.

Only n-gram (prompt lookup) proposals are built; a draft model is refused with a clear
error until it is.
"""

from __future__ import annotations

import json
from dataclasses import fields

from model_runner.config import EngineConfigError, SpeculativeConfig

MAX_SPECULATIVE_TOKENS = 8


def parse_speculative_config(text: str | dict) -> SpeculativeConfig:
    """The config of the flag's JSON (or a dict); EngineConfigError naming what is wrong."""
    try:
        raw = json.loads(text) if isinstance(text, str) else dict(text)
    except json.JSONDecodeError as e:
        raise EngineConfigError(f"--speculative-config is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise EngineConfigError("--speculative-config must be a JSON object")
    known = {f.name for f in fields(SpeculativeConfig)}
    method = raw.get("method", "ngram")
    if method in ("draft_model", "draft", "eagle", "medusa", "mtp"):
        raise EngineConfigError(
            f'--speculative-config method {method!r} is not supported yet: use "ngram"'
        )
    if method != "ngram":
        raise EngineConfigError(f"--speculative-config: unknown method {method!r} (ngram)")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise EngineConfigError(f"--speculative-config: unknown keys {unknown}")
    try:
        config = SpeculativeConfig(**raw)
    except TypeError as e:
        raise EngineConfigError(f"--speculative-config: {e}") from None
    check_speculative_config(config)
    return config


def check_speculative_config(c: SpeculativeConfig) -> None:
    def whole(name: str, value, low: int, high: int | None = None) -> None:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise EngineConfigError(f"--speculative-config: {name} must be an integer {span}")

    whole("num_speculative_tokens", c.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
    whole("prompt_lookup_min", c.prompt_lookup_min, 1)
    whole("prompt_lookup_max", c.prompt_lookup_max, 1)
    if c.prompt_lookup_min > c.prompt_lookup_max:
        raise EngineConfigError(
            "--speculative-config: prompt_lookup_min must not exceed prompt_lookup_max"
        )
    whole("backoff_window", c.backoff_window, 1)
    whole("backoff_steps", c.backoff_steps, 0)
    if not 0 <= c.backoff_min_acceptance <= 1:
        raise EngineConfigError("--speculative-config: backoff_min_acceptance must be in 0..1")
