"""The request body of OpenAI's Responses API (`POST /v1/responses`), and its field check.

Unlike the chat path (which ignores unknown fields, as vLLM does), a Responses request
with a field this server does not implement is a 400 naming it, as OpenAI answers for
unknown fields: an agent must not believe that `include`, `reasoning` or a hosted tool
took effect. A few fields are accepted at their default values only (the OpenAI SDKs and
the Agents SDK send some of them always, e.g. `include: []`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from api.errors import bad_request


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """The fields this server implements (README, "Responses API")."""

    model: str | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # None: true, OpenAI's default
    previous_response_id: str | None = None
    stream: bool | None = None
    user: str | None = None  # accepted and unused, as on the chat path


SUPPORTED_FIELDS = frozenset(f.encode_name for f in msgspec.structs.fields(ResponsesRequest))

# Fields accepted only at these values (their defaults): anything else is a 400.
DEFAULT_ONLY_FIELDS: dict[str, tuple[Any, ...]] = {
    "include": (None, []),
    "truncation": (None, "disabled"),
    "background": (None, False),
    "service_tier": (None, "auto", "default"),
    "top_logprobs": (None, 0),
    "reasoning": (None,),
    "conversation": (None,),
    "prompt": (None,),
    "prompt_cache_key": (None,),
    "prompt_cache_retention": (None,),
    "prompt_cache_options": (None,),
    "max_tool_calls": (None,),
    "stream_options": (None,),
    "context_management": (None,),
    "safety_identifier": (None,),
}


def check_fields(body: Any) -> None:
    """400 for a field that is neither implemented nor at its only accepted value."""
    if not isinstance(body, dict):
        return  # decode_body names the type error
    for name, value in body.items():
        if name in SUPPORTED_FIELDS:
            continue
        if name not in DEFAULT_ONLY_FIELDS:
            raise bad_request(f"`{name}` is not a Responses API field this server knows.", name)
        if not any(value == ok and type(value) is type(ok) for ok in DEFAULT_ONLY_FIELDS[name]):
            raise bad_request(f"`{name}` is not supported by this server.", name)
