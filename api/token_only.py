"""`--skip-tokenizer-init` (vLLM's flag): prompts and outputs as token ids only.

No tokenizer is loaded in the API, tokenizer or detokenizer processes; completions take
token-id prompts and answer with `choices[].token_ids` (as vLLM returns them) and empty
`text`. What needs text (a text prompt, a chat, echo, stop strings, structured outputs,
/tokenize, /detokenize) is a 400 that names the flag.
"""

from __future__ import annotations

from api.errors import ApiError, bad_request

FLAG = "--skip-tokenizer-init"


def needs_tokenizer(what: str, param: str | None) -> ApiError:
    return bad_request(
        f"{what} needs a tokenizer, and this server runs with {FLAG}: send prompts as token "
        "ids (`prompt`: a list of ints, or a list of such lists) to /v1/completions.",
        param,
        "tokenizer_skipped",
    )


def check_token_only_completion(req, prompts: list, has_constraint: bool) -> None:
    """A completion request a server without a tokenizer can serve (ApiError 400 if not)."""
    if any(isinstance(p, str) for p in prompts):
        raise needs_tokenizer("A text prompt", "prompt")
    if req.echo:
        raise needs_tokenizer("`echo`", "echo")
    if req.stop:
        raise needs_tokenizer("`stop` strings", "stop")
    if has_constraint:
        raise needs_tokenizer("Structured output", "response_format")
