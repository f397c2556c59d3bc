"""Request validation: every bad field is a 400 naming it, before anything is allocated.

Limits (documented choices where OpenAI and vLLM differ):
- The numbers are in `Limits` (below). `n` <= 128 (OpenAI's limit; vLLM has none), at most
  16 stop strings of at most 256 characters (OpenAI allows 4, vLLM no limit), at most 256
  prompts in one /v1/completions batch, 1024 `logit_bias` entries, 2048 chat messages.
- `logprobs` / `top_logprobs` <= `--max-logprobs`.
- Ranges follow vLLM's `SamplingParams._verify_args`, with OpenAI's temperature range
  [0, 2]; `logit_bias` values in [-100, 100] and ids in the vocabulary.
- Prompt length: token-id prompts are checked here (prompt + max_tokens <= max_model_len);
  text prompts are tokenized by the engine's tokenizer actor, which refuses an overlong one
  with a 400 before the first delta (an `EngineRequestError`). A `max_tokens` that leaves no
  room for even one prompt token is refused here.
- Tools: at most 128 per request (OpenAI's limit), names of 1-64 letters, digits, `_`, `-`
  (`api.tools`). JSON schemas (tool parameters, response_format, guided_json): at most
  64 KiB of JSON and 32 levels of nesting each (`api.json_schema_check`); a regex or EBNF
  grammar at most 64 Ki characters, a choice list at most 1024 strings
  (`api.structured_outputs`). A grammar compile slower than --structured-outputs-timeout
  (10 s) is refused by the engine with a 400.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from api.errors import ApiError, bad_request
from api.openai_protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from model_runner.sampling_params import GrammarSpec, SamplingParams

T = TypeVar("T")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: the table of limits (README, "Limits"). The model's
    numbers come from the engine, `max_logprobs` from `--max-logprobs`; the rest are
    documented constants. Every one exceeded is a 400 naming its field."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int = 20  # logprobs / top_logprobs
    max_n: int = 128  # n (and best_of, which must equal n)
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string (matching keeps every prefix)
    max_prompts: int = 256  # prompts in one /v1/completions batch
    max_logit_bias: int = 1024  # logit_bias entries
    max_messages: int = 2048  # chat messages


_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")


def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode a JSON body into `type_`; a type error is a 400 naming the field."""
    if not body.strip():
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        raise bad_request(_field_message(str(e)), param=_field_param(str(e))) from None
    except msgspec.DecodeError as e:
        raise bad_request(f"The request body is not valid JSON: {e}") from None


def _field_param(message: str) -> str | None:
    path = m.group("path").replace("[...]", "") if (m := _AT_PATH.search(message)) else ""
    if (missing := _MISSING.search(message)) is not None:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return path or None


def _field_message(message: str) -> str:
    param = _field_param(message)
    text = _AT_PATH.sub("", message)
    return f"Invalid value for `{param}`: {text}" if param else f"Invalid request: {text}"


def check_model(requested: str | None, served: str, adapters: Collection[str] = ()) -> str | None:
    """A named model must be the served one or one of its LoRA adapters (404 NotFoundError,
    param "model"); returns the adapter's name, None for the base model."""
    if requested is None or requested == served:
        return None
    if requested in adapters:
        return requested
    raise ApiError(404, f"The model `{requested}` does not exist.", param="model")


def check_token_ids(ids: Any, limits: Limits, param: str) -> list[int]:
    """A list of ints within the vocabulary."""
    if not isinstance(ids, list):
        raise bad_request(f"`{param}` must be a list of token ids.", param)
    for i, tok in enumerate(ids):
        if type(tok) is not int:
            raise bad_request(f"`{param}[{i}]` must be an integer token id.", param)
        if not 0 <= tok < limits.vocab_size:
            raise bad_request(
                f"Token id {tok} in `{param}` is out of vocabulary (size {limits.vocab_size}).",
                param,
            )
    return ids


def check_prompt_fits(num_prompt_tokens: int, max_tokens: int | None, limits: Limits) -> None:
    """vLLM's context-length check for a prompt whose token count is known."""
    total = num_prompt_tokens + (max_tokens or 0)
    if num_prompt_tokens >= limits.max_model_len or total > limits.max_model_len:
        param = "max_tokens" if num_prompt_tokens < limits.max_model_len else "prompt"
        raise bad_request(
            f"This model's maximum context length is {limits.max_model_len} tokens. However, "
            f"you requested {total} tokens ({num_prompt_tokens} in the prompt, "
            f"{max_tokens or 0} in the completion). Please reduce the length of the prompt "
            "or completion.",
            param,
        )


# --- request -> SamplingParams ----------------------------------------------------------


def chat_sampling_params(
    req: ChatCompletionRequest,
    limits: Limits,
    grammar: GrammarSpec | None = None,
    *,
    trust_request_chat_template: bool = False,
) -> SamplingParams:
    """SamplingParams of a chat request (max_completion_tokens wins over max_tokens)."""
    if req.messages is not None and len(req.messages) > limits.max_messages:
        raise bad_request(f"`messages` holds at most {limits.max_messages} messages.", "messages")
    if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
        raise bad_request(
            "When using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"
        )
    if req.add_generation_prompt and req.continue_final_message:
        raise bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to true.",
            "continue_final_message",
        )
    if req.chat_template is not None and not trust_request_chat_template:
        raise bad_request(
            "A chat template in the request is not accepted unless the server runs with "
            "--trust-request-chat-template.",
            "chat_template",
        )
    if req.echo:
        raise bad_request("`echo` is not supported for chat completions.", "echo")
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = (
        req.max_completion_tokens if max_param == "max_completion_tokens" else req.max_tokens
    )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _build(req, max_tokens, logprobs, limits, grammar)
    verify_sampling_params(params, limits, {"max_tokens": max_param, "logprobs": "top_logprobs"})
    return params


def completion_sampling_params(
    req: CompletionRequest, limits: Limits, grammar: GrammarSpec | None = None
) -> SamplingParams:
    if req.suffix is not None:
        raise bad_request("`suffix` is not supported.", "suffix")
    params = _build(req, req.max_tokens, req.logprobs, limits, grammar)
    verify_sampling_params(params, limits)
    return params


def _build(
    req: _SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    limits: Limits,
    grammar: GrammarSpec | None,
) -> SamplingParams:
    _check_unsupported(req)
    return SamplingParams(
        n=req.n,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=0 if req.top_k is None else req.top_k,
        top_p=1.0 if req.top_p is None else req.top_p,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias, limits),
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        grammar=grammar,
    )


def _check_unsupported(req: _SamplingFields) -> None:
    """Fields that are accepted by name but whose non-default values this server lacks."""
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("`best_of` different from `n` is not supported.", "best_of")
    if req.use_beam_search:
        raise bad_request("Beam search is not supported.", "use_beam_search")
    if req.prompt_logprobs is not None:
        raise bad_request("`prompt_logprobs` is not supported.", "prompt_logprobs")
    if req.truncate_prompt_tokens is not None:
        raise bad_request("`truncate_prompt_tokens` is not supported.", "truncate_prompt_tokens")
    if req.priority != 0:
        raise bad_request("Priority scheduling is not enabled.", "priority")
    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    if req.cache_salt is not None and not req.cache_salt:
        raise bad_request("`cache_salt` must be a non-empty string if provided.", "cache_salt")
    _check_metadata(req.metadata)


def _check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise bad_request(f"`metadata` holds at most {MAX_METADATA_PAIRS} pairs.", "metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise bad_request(
                f"`metadata` keys are at most {MAX_METADATA_KEY} characters and values at "
                f"most {MAX_METADATA_VALUE}.",
                "metadata",
            )


def _logit_bias(bias: dict[str, float] | None, limits: Limits) -> dict[int, float] | None:
    if not bias:
        return None
    if len(bias) > limits.max_logit_bias:
        raise bad_request(
            f"`logit_bias` holds at most {limits.max_logit_bias} entries.", "logit_bias"
        )
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):  # NOTE: int() also takes "+1", " 1", "١"
            raise bad_request(f"`logit_bias` key {key!r} is not a token id.", "logit_bias")
        tok = int(key)
        if not 0 <= tok < limits.vocab_size:
            raise bad_request(f"`logit_bias` token id {tok} is out of vocabulary.", "logit_bias")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise bad_request(f"`logit_bias` value {value} is outside [-100, 100].", "logit_bias")
        out[tok] = float(value)
    return out


# --- ranges, shared with the offline API ------------------------------------------------


def verify_sampling_params(
    p: SamplingParams, limits: Limits, names: dict[str, str] | None = None
) -> None:
    """Range-check SamplingParams (vLLM's _verify_args); `names` maps fields to request params."""
    names = names or {}
    _integer(p, "n", 1, limits.max_n, names)
    _number(p, "temperature", 0.0, 2.0, names)
    _number(p, "top_p", 0.0, 1.0, names, lo_open=True)
    _integer(p, "top_k", -1, INT64_MAX, names)
    _number(p, "min_p", 0.0, 1.0, names)
    _number(p, "presence_penalty", -2.0, 2.0, names)
    _number(p, "frequency_penalty", -2.0, 2.0, names)
    _number(p, "repetition_penalty", 0.0, math.inf, names, lo_open=True)
    _integer(p, "seed", INT64_MIN, INT64_MAX, names, optional=True)
    _integer(p, "max_tokens", 1, limits.max_model_len - 1, names, optional=True)
    max_tokens = p.max_tokens if type(p.max_tokens) is int else limits.max_model_len - 1
    _integer(p, "min_tokens", 0, max_tokens, names)
    _integer(p, "logprobs", 0, limits.max_logprobs, names, optional=True)
    if not isinstance(p.stop, list) or len(p.stop) > limits.max_stop:
        raise bad_request(f"`stop` holds at most {limits.max_stop} strings.", "stop")
    if any(not isinstance(s, str) or not s for s in p.stop):
        raise bad_request("`stop` must hold non-empty strings.", "stop")
    if any(len(s) > limits.max_stop_chars for s in p.stop):
        raise bad_request(
            f"A stop string may have at most {limits.max_stop_chars} characters.", "stop"
        )
    check_token_ids(p.stop_token_ids, limits, "stop_token_ids")


def _number(
    p: SamplingParams, field: str, lo: float, hi: float, names: dict, lo_open: bool = False
) -> None:
    value, name = getattr(p, field), names.get(field, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"`{name}` must be a number, got {value!r}.", name)
    if not (math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi}{')' if math.isinf(hi) else ']'}"
        raise bad_request(f"`{name}` must be in {bounds}, got {value}.", name)


def _integer(
    p: SamplingParams, field: str, lo: int, hi: int, names: dict, optional: bool = False
) -> None:
    value, name = getattr(p, field), names.get(field, field)
    if value is None and optional:
        return
    if type(value) is not int or not lo <= value <= hi:
        raise bad_request(f"`{name}` must be an integer in [{lo}, {hi}], got {value!r}.", name)


def completion_prompts(req: CompletionRequest, limits: Limits) -> list[str | list[int]]:
    """The prompts of a /v1/completions request: a text, texts, token ids or lists of ids."""
    prompt = req.prompt
    if prompt is None:
        raise bad_request("`prompt` is required.", "prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(type(x) is int for x in prompt):
        prompts = [prompt]
    elif prompt and all(isinstance(x, (str, list)) for x in prompt):
        prompts = prompt
    else:
        raise bad_request(
            "`prompt` must be a string, a list of strings, a list of token ids or "
            "a list of lists of token ids, and not empty.",
            "prompt",
        )
    if len(prompts) > limits.max_prompts:
        raise bad_request(f"At most {limits.max_prompts} prompts per request.", "prompt")
    for one in prompts:
        if isinstance(one, str):
            if not one:
                raise bad_request("`prompt` must not be empty.", "prompt")
            continue
        if not one:
            raise bad_request("`prompt` must not be an empty list of token ids.", "prompt")
        check_token_ids(one, limits, "prompt")
        check_prompt_fits(len(one), req.max_tokens, limits)
    return prompts
