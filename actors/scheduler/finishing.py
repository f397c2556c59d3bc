"""When a sequence stops, and what the detokenizer is told about a request."""

from __future__ import annotations

from collections.abc import Set

from actors.detokenize import PROMPT_CONTEXT_TOKENS
from actors.protocol import DetokParams
from actors.scheduler.sequence import Request, Sequence


def check_stop(
    seq: Sequence, token: int, eos_token_ids: Set[int], max_model_len: int
) -> tuple[str | None, int | None]:
    """(finish_reason, stop_reason) after `token` was appended to `seq`, (None, None) if it
    goes on. No eos or stop-token finish before min_tokens; eos is ignored with ignore_eos.
    NOTE: under a grammar, eos always ends: the grammar allows it only once it is complete
    (min_tokens then yields to it in the sampler), and a finished grammar allows nothing else.
    """
    request = seq.request
    sp = request.sampling
    num_out = seq.num_output_tokens
    if sp.grammar is not None and token in eos_token_ids:
        return "stop", None
    if num_out >= sp.min_tokens:
        if not sp.ignore_eos and token in eos_token_ids:
            return "stop", None
        if token in request.stop_token_ids:
            return "stop", token
    if num_out >= request.max_tokens or seq.num_tokens >= max_model_len:
        return "length", None
    return None, None


def detok_params(request: Request) -> DetokParams:
    """The request's DetokParams; marks it started (sent with its first outputs)."""
    sp = request.sampling
    request.started = True
    return DetokParams(
        request_id=request.request_id,
        n=max(1, sp.n),
        stop=list(sp.stop),
        include_stop_str_in_output=sp.include_stop_str_in_output,
        skip_special_tokens=sp.skip_special_tokens,
        num_prompt_tokens=len(request.prompt_token_ids),
        num_cached_tokens=request.num_cached_tokens,
        prompt_tail=list(request.prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]),
        queue_seconds=request.queue_seconds or 0.0,
    )
