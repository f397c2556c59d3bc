"""Chat messages -> one prompt string, through a chat template.

The template is `--chat-template FILE` when given, else the tokenizer's own; a request that
uses tools (in `tools` or in its history) on a model whose template has no tool support
gets the bundled hermes template (`api/templates/hermes.jinja`), whose `<tool_call>` format
the hermes parser and the forced-call grammar share.
The rendered prompt already holds the template's special tokens, so the engine gets it with
`add_special_tokens=False` (the request's `add_special_tokens`, default False for chat).
The server's templates render through `tokenizer.apply_chat_template` (transformers renders
in jinja2's ImmutableSandboxedEnvironment); a request's own `chat_template`, allowed only
with `--trust-request-chat-template`, renders in the bounded sandbox of
`api.template_sandbox`. Control-token spellings in client data stay text
(`api.control_tokens`): the result carries their spans for the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Any

import jinja2
import jinja2.meta

from api.control_tokens import ControlTokenSpellings
from api.errors import bad_request
from api.openai_protocol import ChatMessage
from api.template_sandbox import TemplateLimitError, render_request_template

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
        "sanitize_control_tokens",
    }
)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message


@dataclass(frozen=True)
class RenderedChat:
    """A rendered prompt and the spans of client-written control-token spellings in it."""

    text: str
    literal_spans: list[tuple[int, int]] = field(default_factory=list)


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
    """Validated messages as the plain dicts that chat templates read.

    Assistant `tool_calls` arguments arrive as OpenAI's JSON string or as an object; the
    templates get an object. A `tool` message must answer an earlier call's id.
    """
    if not messages:
        raise bad_request("`messages` must be a non-empty list.", "messages")
    out = []
    call_ids: set[str] = set()
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
        for key in ("name", "tool_call_id"):
            if (value := getattr(msg, key)) is not None:
                item[key] = value
        if msg.tool_calls:
            item["tool_calls"] = _tool_calls(msg.tool_calls, f"messages[{i}].tool_calls")
            call_ids.update(call["id"] for call in item["tool_calls"])
        if msg.role == "tool" and msg.tool_call_id not in call_ids:
            raise bad_request(
                "A `tool` message needs the `tool_call_id` of an earlier assistant tool call.",
                f"messages[{i}].tool_call_id",
            )
        out.append(item)
    return out


def _tool_calls(calls: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function")
        if not isinstance(call.get("id"), str) or not isinstance(fn, dict):
            raise bad_request("A tool call needs an `id` and a `function`.", f"{param}[{j}]")
        if not isinstance(fn.get("name"), str):
            raise bad_request("A tool call needs a function `name`.", f"{param}[{j}].function.name")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = None
        if not isinstance(arguments, dict):
            raise bad_request(
                "Tool call arguments must be a JSON object (or its text).",
                f"{param}[{j}].function.arguments",
            )
        out.append({**call, "type": "function", "function": {**fn, "arguments": arguments}})
    return out


def uses_tools(messages: list[ChatMessage] | None, tools: list | None) -> bool:
    """Whether rendering needs a template with tool support."""
    return bool(tools) or any(m.role == "tool" or m.tool_calls for m in messages or ())


def bundled_template(name: str) -> str:
    return resources.files("api").joinpath("templates", f"{name}.jinja").read_text()


def template_supports_tools(template: str | None) -> bool:
    """Whether a Jinja chat template reads the `tools` variable at all."""
    if not template:
        return False
    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


@dataclass(frozen=True)
class ChatTemplates:
    """Which template renders a chat: `override` (--chat-template), or the tokenizer's own,
    or the bundled hermes template when tools are in play and the model's cannot show them."""

    tokenizer: Any
    override: str | None = None
    hermes: str = field(default_factory=lambda: bundled_template("hermes"))

    @cached_property
    def model_supports_tools(self) -> bool:
        return template_supports_tools(getattr(self.tokenizer, "chat_template", None))

    @cached_property
    def spellings(self) -> ControlTokenSpellings:
        return ControlTokenSpellings(self.tokenizer)

    def pick(self, with_tools: bool) -> str | None:
        """The template text to render with (None: the tokenizer's own)."""
        if self.override is not None:
            return self.override
        if with_tools and not self.model_supports_tools:
            return self.hermes
        return None


def render_chat(
    tokenizer,
    messages: list[ChatMessage] | None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    template: str | None = None,
    request_template: str | None = None,
    spellings: ControlTokenSpellings | None = None,
) -> RenderedChat:
    """Render a chat with `request_template` (a request's own, sandboxed), else `template`
    (None: the tokenizer's own); a template error is a 400 on `messages` (on `chat_template`
    for a request's template). `spellings`: the tokenizer's, when the caller keeps them."""
    conv = conversation(messages)
    extra = dict(chat_template_kwargs or {})
    if reserved := sorted(RESERVED_TEMPLATE_KWARGS.intersection(extra)):
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(reserved)}.", "chat_template_kwargs"
        )
    if request_template is None and template is None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise bad_request("This model has no chat template; use /v1/completions.", "messages")
    mask = (spellings or ControlTokenSpellings(tokenizer)).masker()
    if mask is not None:
        conv, tools, documents, extra = (mask.mask(x) for x in (conv, tools, documents, extra))
    options = dict(
        tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, extra=extra,
    )  # fmt: skip
    if request_template is not None:
        prompt = _render_request_template(tokenizer, request_template, conv, **options)
    else:
        prompt = _render_server_template(tokenizer, template, conv, **options)
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("The chat template rendered an empty prompt.", "messages")
    if mask is None:
        return RenderedChat(prompt)
    return RenderedChat(*mask.unmask(prompt))


def _render_server_template(tokenizer, template, conv, *, extra, **options) -> str:
    try:
        return tokenizer.apply_chat_template(
            conv, chat_template=template, tokenize=False, **options, **extra
        )
    except Exception as e:  # jinja2 errors, raise_exception() in templates, bad tool specs
        raise bad_request(
            f"The chat template could not render the messages: {e}", "messages"
        ) from None


def _render_request_template(
    tokenizer, template, conv, *, continue_final_message, extra, **options
) -> str:
    """As transformers renders a template (same context, same continue_final_message cut),
    in the bounded sandbox. Runs in a worker thread (the caller's)."""
    if continue_final_message:
        conv = [*conv[:-1], {**conv[-1], "content": conv[-1]["content"] + _CONTINUE_TAG}]
    context = {**getattr(tokenizer, "special_tokens_map", {}), **extra, **options, "messages": conv}
    try:
        prompt = render_request_template(template, context)
    except (TemplateLimitError, jinja2.exceptions.SecurityError) as e:
        raise bad_request(
            f"The request's chat template was stopped: {e}.", "chat_template"
        ) from None
    except Exception as e:  # syntax errors, raise_exception(), errors of its own
        raise bad_request(f"The request's chat template failed: {e}", "chat_template") from None
    if continue_final_message:
        cut = prompt.rfind(_CONTINUE_TAG.strip())
        if cut < 0:
            raise bad_request(
                "The chat template dropped the final message to continue.", "chat_template"
            )
        prompt = prompt[:cut] if prompt.startswith(_CONTINUE_TAG, cut) else prompt[:cut].rstrip()
    return prompt
