"""Response bodies and SSE chunks in OpenAI's (and vLLM's) exact shapes."""

from __future__ import annotations

from actors.protocol import TextDelta, TokenLogprob
from api.streaming import Accumulator, Choice
from api.tool_calls import ChoiceToolCalls, call_deltas, read_tool_calls
from api.tools import NO_TOOLS, ToolPlan

# --- logprobs ---------------------------------------------------------------------------


def chat_logprobs(items: list[TokenLogprob]) -> dict:
    """Chat shape: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [
                    {"token": tok, "logprob": value, "bytes": list(tok.encode())}
                    for _, tok, value in lp.top
                ],
            }
            for lp in items
        ]
    }


def completion_logprobs(items: list[TokenLogprob], offset: int = 0) -> dict:
    """Legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets = []
    for lp in items:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{tok: value for _, tok, value in lp.top} for lp in items],
        "text_offset": offsets,
    }


# --- non-streamed -----------------------------------------------------------------------


def chat_response(
    request_id: str,
    created: int,
    model: str,
    acc: Accumulator,
    logprobs: bool,
    tool_plan: ToolPlan = NO_TOOLS,
) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [_chat_choice(c, logprobs, tool_plan) for c in acc.choices],
        "usage": acc.usage(),
        "system_fingerprint": None,
        "prompt_logprobs": None,
    }


def _chat_choice(c: Choice, logprobs: bool, tool_plan: ToolPlan) -> dict:
    content, calls, finish_reason = c.text, [], c.finish_reason
    if tool_plan.parser is not None:
        content, calls, reader = read_tool_calls(tool_plan, c.text)
        finish_reason = reader.finish_reason(c.finish_reason)
    return {
        "index": c.index,
        "message": {
            "role": "assistant",
            "content": content,
            "refusal": None,
            "tool_calls": calls,
        },
        "logprobs": chat_logprobs(c.logprobs) if logprobs else None,
        "finish_reason": finish_reason,
        "stop_reason": c.stop_reason,
    }


def completion_response(
    request_id: str,
    created: int,
    model: str,
    acc: Accumulator,
    logprobs: bool,
    echo: list[str] | None = None,
    token_ids: bool = False,
) -> dict:
    """`echo`: per-prompt text prepended to each of its choices. `token_ids`: each choice
    carries its output token ids (vLLM's `choices[].token_ids`)."""
    choices = [_completion_choice(c, acc.n, logprobs, echo) for c in acc.choices]
    if token_ids:
        for body, c in zip(choices, acc.choices, strict=True):
            body["token_ids"] = list(c.token_ids)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": acc.usage(),
        "system_fingerprint": None,
    }


def _completion_choice(c: Choice, n: int, logprobs: bool, echo: list[str] | None) -> dict:
    prefix = echo[c.index // n] if echo else ""
    return {
        "index": c.index,
        "text": prefix + c.text,
        "logprobs": completion_logprobs(c.logprobs, len(prefix)) if logprobs else None,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
        "prompt_logprobs": None,
    }


# --- streamed ---------------------------------------------------------------------------


class _Streamer:
    """Turns deltas into SSE chunk dicts; subclasses give the choice shape."""

    object_name = ""

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        acc: Accumulator,
        *,
        logprobs: bool,
        include_usage: bool,
        continuous_usage: bool = False,
        token_ids: bool = False,
    ) -> None:
        self.request_id, self.created, self.model = request_id, created, model
        self.token_ids = token_ids  # each chunk carries its delta's token ids
        self.acc = acc
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.continuous_usage = include_usage and continuous_usage

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {
            "id": self.request_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return body

    def start(self) -> list[dict]:
        return []

    def on_delta(self, src: int, delta: TextDelta) -> list[dict]:
        """Zero or one chunk for one delta (empty non-final deltas without logprobs vanish)."""
        choice = self.acc.add(src, delta, keep=False)
        has_ids = self.token_ids and delta.token_ids
        if not delta.text and not has_ids and delta.finish_reason is None and not delta.logprobs:
            return []
        usage = self.acc.usage() if self.continuous_usage else None
        return [self.chunk([self.choice(choice, delta)], usage)]

    def choice(self, choice: Choice, delta: TextDelta) -> dict:
        raise NotImplementedError

    def finish(self) -> list[dict]:
        """The final usage chunk (`choices: []`) when stream_options.include_usage."""
        return [self.chunk([], self.acc.usage())] if self.include_usage else []

    def failed(self, error: dict) -> list[dict]:
        """A stream cut short by an error ends with the error body as its last chunk."""
        return [error]


class ChatStreamer(_Streamer):
    """Chat chunks; with a tool parser, `delta.tool_calls` as each call completes."""

    object_name = "chat.completion.chunk"

    def __init__(self, *args, tool_plan: ToolPlan = NO_TOOLS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.readers = None
        if tool_plan.parser is not None:
            self.readers = [ChoiceToolCalls(tool_plan) for _ in self.acc.choices]

    def start(self) -> list[dict]:
        """First chunk of every choice: the assistant role and empty content."""
        first = {"role": "assistant", "content": ""}
        return [
            self.chunk(
                [{"index": c.index, "delta": first, "logprobs": None, "finish_reason": None}]
            )
            for c in self.acc.choices
        ]

    def choice(self, choice: Choice, delta: TextDelta) -> dict:
        out = {
            "index": choice.index,
            "delta": {"content": delta.text},
            "logprobs": chat_logprobs(delta.logprobs or []) if self.logprobs else None,
            "finish_reason": delta.finish_reason,
        }
        if delta.finish_reason is not None:
            out["stop_reason"] = delta.stop_reason
        return out

    def on_delta(self, src: int, delta: TextDelta) -> list[dict]:
        if self.readers is None:
            return super().on_delta(src, delta)
        choice = self.acc.add(src, delta, keep=False)
        reader = self.readers[choice.index]
        bodies = _delta_bodies(reader, delta)
        if delta.logprobs and self.logprobs and not bodies:
            bodies = [{"content": ""}]
        usage = self.acc.usage() if self.continuous_usage else None
        chunks = []
        for i, body in enumerate(bodies):  # NOTE: the delta's logprobs ride on its first chunk
            lp = chat_logprobs(delta.logprobs or []) if self.logprobs and i == 0 else None
            part = {"index": choice.index, "delta": body, "logprobs": lp, "finish_reason": None}
            chunks.append(self.chunk([part], usage))
        if delta.finish_reason is not None:
            end = {"index": choice.index, "delta": {}, "logprobs": None,
                   "finish_reason": reader.finish_reason(delta.finish_reason),
                   "stop_reason": delta.stop_reason}  # fmt: skip
            chunks.append(self.chunk([end], usage))
        return chunks


def _delta_bodies(reader: ChoiceToolCalls, delta: TextDelta) -> list[dict]:
    """The `delta` objects one engine delta makes: content pieces and tool-call deltas."""
    items = reader.feed(delta.text)
    if delta.finish_reason is not None:
        items += reader.finish()
    bodies = []
    for item in items:
        if isinstance(item, str):
            bodies.append({"content": item})
        else:
            index = reader.calls.index(item)
            bodies.extend({"tool_calls": [d]} for d in call_deltas(index, item))
    return bodies


class CompletionStreamer(_Streamer):
    object_name = "text_completion"

    def __init__(self, *args, echo: list[str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.echo = echo
        self.offsets = [0] * len(self.acc.choices)  # text offset of each choice so far
        self.echoed: set[int] = set()

    def choice(self, choice: Choice, delta: TextDelta) -> dict:
        prefix = ""
        if self.echo and choice.index not in self.echoed:
            self.echoed.add(choice.index)
            prefix = self.echo[choice.index // self.acc.n]
        text = prefix + delta.text
        offset = self.offsets[choice.index] + len(prefix)
        logprobs = completion_logprobs(delta.logprobs or [], offset) if self.logprobs else None
        self.offsets[choice.index] += len(text)
        out = {
            "index": choice.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
        }
        if self.token_ids:
            out["token_ids"] = list(delta.token_ids)
        return out
