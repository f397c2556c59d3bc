"""Speculative decoding's settings: vLLM's `--speculative-config` JSON, checked at start-up.

Two methods: n-gram (prompt lookup, proposed by the scheduler) and a draft model (proposed
by the runner, model_runner/draft_model.py). The draft's files and vocabulary are checked
when the runner resolves it (model_runner/draft_model.py: resolve_draft).
"""

from __future__ import annotations

import json
from dataclasses import fields

from model_runner.config import EngineConfigError, SpeculativeConfig

MAX_SPECULATIVE_TOKENS = 8
METHODS = ("ngram", "draft_model")


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
    if method == "draft":  # vLLM's older spelling
        raw["method"] = method = "draft_model"
    if method in ("eagle", "eagle3", "medusa", "mtp"):
        raise EngineConfigError(
            f'--speculative-config method {method!r} is not supported: use "ngram" or "draft_model"'
        )
    if method not in METHODS:
        raise EngineConfigError(
            f"--speculative-config: unknown method {method!r} (ngram, draft_model)"
        )
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
    if c.method == "draft_model" and not (isinstance(c.model, str) and c.model):
        raise EngineConfigError(
            '--speculative-config: method "draft_model" needs "model": a .gguf file, an HF '
            "folder, or a config for random weights"
        )
    if c.load_format not in ("auto", "dummy"):
        raise EngineConfigError("--speculative-config: load_format must be auto or dummy")
    whole("backoff_window", c.backoff_window, 1)
    whole("backoff_steps", c.backoff_steps, 0)
    if c.disable_by_batch_size is not None:
        whole("disable_by_batch_size", c.disable_by_batch_size, 1)
    if not 0 <= c.backoff_min_acceptance <= 1:
        raise EngineConfigError("--speculative-config: backoff_min_acceptance must be in 0..1")
