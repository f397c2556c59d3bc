"""A Responses request -> the chat request the chat path serves (template, tools, grammar).

Input items become chat messages: `message` items (roles user, system, developer,
assistant; `input_text` / `output_text` parts), `function_call` items (an assistant
message's `tool_calls`; consecutive calls share one message) and `function_call_output`
items (`tool` messages). Function tools, `tool_choice` and `text.format` become their chat
spellings, so `api.tools` and `api.structured_outputs` check and enforce them. Anything
else (hosted tools, images, files, audio, reasoning items) is a 400 naming it.
"""

from __future__ import annotations

import re
from typing import Any

from api.errors import ApiError, bad_request
from api.openai_protocol import ChatCompletionRequest, ChatMessage
from api.responses_protocol import ResponsesRequest

MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
TEXT_PARTS = frozenset({"input_text", "output_text"})


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """`input` as a list of items (a string is one user message)."""
    if req.input is None:
        raise bad_request("`input` is required.", "input")
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    if not req.input:
        raise bad_request("`input` must be a string or a non-empty list of items.", "input")
    return req.input


def chat_request(
    req: ResponsesRequest, items: list[dict[str, Any]], first_new: int
) -> ChatCompletionRequest:
    """The chat request of `items` (a stored conversation, then this request's input from
    index `first_new`: errors name `input[i]` by its place in this request)."""
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    messages += chat_messages(items, first_new)
    return ChatCompletionRequest(
        model=req.model,
        messages=messages,
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        tools=None if req.tools is None else [_chat_tool(t, i) for i, t in enumerate(req.tools)],
        tool_choice=_chat_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=_response_format(req.text),
        metadata=req.metadata,
    )


def chat_messages(items: list[dict[str, Any]], first_new: int = 0) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    for i, item in enumerate(items):
        param = f"input[{i - first_new}]" if i >= first_new else "previous_response_id"
        if not isinstance(item, dict):
            raise bad_request("An input item must be an object.", param)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call = _tool_call(item, param)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", param)
            content = _text(item.get("output"), f"{param}.output")
            messages.append(ChatMessage(role="tool", content=content, tool_call_id=call_id))
        else:
            raise bad_request(f"Input items of type {kind!r} are not supported.", f"{param}.type")
    return messages


def _message(item: dict[str, Any], param: str) -> ChatMessage:
    role = item.get("role")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        raise bad_request(
            f"A message's role is one of {', '.join(sorted(MESSAGE_ROLES))}.", f"{param}.role"
        )
    content = _text(item.get("content"), f"{param}.content")
    return ChatMessage(role="system" if role == "developer" else role, content=content)


def _text(content: Any, param: str) -> str:
    """A string, or text parts (`input_text`, `output_text`) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("Content must be a string or a list of text parts.", param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise bad_request(
                f"Content parts of type {kind!r} are not supported; only text.", f"{param}[{j}]"
            )
        if not isinstance(part.get("text"), str):
            raise bad_request("A text part needs a string `text`.", f"{param}[{j}].text")
        texts.append(part["text"])
    return "".join(texts)


def _tool_call(item: dict[str, Any], param: str) -> dict[str, Any]:
    return {
        "id": _string(item, "call_id", param),
        "type": "function",
        "function": {
            "name": _string(item, "name", param),
            "arguments": _string(item, "arguments", param),
        },
    }


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"`{key}` must be a string.", f"{param}.{key}")
    return value


def _chat_tool(tool: Any, i: int) -> dict[str, Any]:
    """A Responses function tool (name, description, parameters, strict at the top level)."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise bad_request(
            f"Tools of type {kind!r} are not supported; only `function` tools.", f"tools[{i}].type"
        )
    fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


def _chat_tool_choice(choice: Any) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):  # NOTE: the chat path checks the string
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise bad_request(
        'tool_choice is "none", "auto", "required" or {"type": "function", "name": ...}.',
        "tool_choice",
    )


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format`."""
    if text is None:
        return None
    for key in text:
        if key != "format" and text[key] is not None:
            raise bad_request(f"`text.{key}` is not supported.", f"text.{key}")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("`text.format` must be an object.", "text.format")
    if fmt.get("type") != "json_schema":
        return fmt  # text, json_object; other types are refused by the chat path's check
    spec = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}


# The chat request's parameter names -> the Responses request's, in error messages.
_PARAMS = (
    (re.compile(r"^response_format\.json_schema"), "text.format"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^max_completion_tokens"), "max_output_tokens"),
    (re.compile(r"^max_tokens"), "max_output_tokens"),
    (re.compile(r"^(tools\[\d+\])\.function"), r"\1"),
    (re.compile(r"^messages.*"), "input"),
)


def responses_param(error: ApiError) -> ApiError:
    """The error with its `param` (and the message's mentions of it) in Responses terms."""
    if error.param is None:
        return error
    for pattern, replacement in _PARAMS:
        if pattern.match(error.param):
            new = pattern.sub(replacement, error.param)
            error.message = error.message.replace(error.param, new)
            error.param = new
            break
    return error
