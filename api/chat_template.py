"""Chat messages -> one prompt string, through the tokenizer's own chat template.

The rendered prompt already holds the template's special tokens, so the engine gets it with
`add_special_tokens=False` (the request's `add_special_tokens`, default False for chat).
"""

from __future__ import annotations

from typing import Any

from api.errors import bad_request
from api.openai_protocol import ChatMessage

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
TEXT_PART_TYPES = frozenset({"text", "input_text"})
# Arguments of apply_chat_template that a request's chat_template_kwargs must not replace.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "tools",
        "documents",
        "chat_template",
        "return_dict",
        "return_tensors",
        "tokenizer_kwargs",
        "padding",
        "truncation",
        "max_length",
        "return_assistant_tokens_mask",
    }
)


def message_text(content: str | list[dict[str, Any]] | None, param: str) -> str | None:
    """A message's content as one string: text parts joined with newlines (vLLM's way)."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind not in TEXT_PART_TYPES:
            raise bad_request(
                f"Content part type {kind!r} is not supported; only text parts are.",
                f"{param}[{j}].type",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request("A text content part needs a string `text`.", f"{param}[{j}].text")
        texts.append(text)
    return "\n".join(texts)


def conversation(messages: list[ChatMessage] | None) -> list[dict[str, Any]]:
    """Validated messages as the plain dicts that chat templates read."""
    if not messages:
        raise bad_request("`messages` must be a non-empty list.", "messages")
    out = []
    for i, msg in enumerate(messages):
        if msg.role not in ROLES:
            raise bad_request(
                f"Unknown role {msg.role!r}; one of {', '.join(sorted(ROLES))}.",
                f"messages[{i}].role",
            )
        item: dict[str, Any] = {
            "role": msg.role,
            "content": message_text(msg.content, f"messages[{i}].content"),
        }
        if item["content"] is None and not msg.tool_calls:
            raise bad_request("A message needs `content`.", f"messages[{i}].content")
        if item["content"] is None:
            item["content"] = ""
        for key in ("name", "tool_calls", "tool_call_id"):
            if (value := getattr(msg, key)) is not None:
                item[key] = value
        out.append(item)
    return out


def render_chat(
    tokenizer,
    messages: list[ChatMessage] | None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """Render a chat with the tokenizer's template; a template error is a 400 on `messages`."""
    conv = conversation(messages)
    extra = dict(chat_template_kwargs or {})
    if reserved := sorted(RESERVED_TEMPLATE_KWARGS.intersection(extra)):
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(reserved)}.", "chat_template_kwargs"
        )
    if getattr(tokenizer, "chat_template", None) is None:
        raise bad_request("This model has no chat template; use /v1/completions.", "messages")
    try:
        prompt = tokenizer.apply_chat_template(
            conv,
            tools=tools,
            documents=documents,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **extra,
        )
    except Exception as e:  # jinja2 errors, raise_exception() in templates, bad tool specs
        raise bad_request(
            f"The chat template could not render the messages: {e}", "messages"
        ) from None
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("The chat template rendered an empty prompt.", "messages")
    return prompt
