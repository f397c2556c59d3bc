"""The soak's traffic mix: the request kinds (KINDS, one Mix method each), the checks of
their answers, and the Deck that deals kinds to the client tasks."""

from __future__ import annotations

import json
import random

from prompts import shared_prefix, word_text
from soak_requests import CHAT, TEXT, Choice, Spec

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
NAME_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}},
    "required": ["name"],
    "additionalProperties": False,
}
STOPS = [" the", "\n"]


def no_stop_string(choices: list[Choice]) -> str | None:
    hits = [s for c in choices for s in STOPS if s in c.text]
    return f"stop string {hits[0]!r} in the output" if hits else None


def json_named(choices: list[Choice]) -> str | None:
    """A finished answer parses and fits NAME_SCHEMA (a cut one may not)."""
    for c in choices:
        if c.finish_reason != "stop":
            continue
        try:
            value = json.loads(c.text)
        except ValueError:
            return f"not JSON: {c.text[:80]!r}"
        if not isinstance(value, dict) or set(value) != {"name"} or len(value["name"]) > 16:
            return f"off the schema: {c.text[:80]!r}"
    return None


def forced_tool(choices: list[Choice]) -> str | None:
    """tool_choice required: a finished answer is calls of get_weather with a city."""
    for c in choices:
        if c.finish_reason == "length":
            continue
        if c.finish_reason != "tool_calls" or not c.tools:
            return f"finish_reason {c.finish_reason} without a tool call"
        for name, arguments in c.tools:
            try:
                args = json.loads(arguments)
            except ValueError:
                return f"tool arguments not JSON: {arguments[:80]!r}"
            if name != "get_weather" or not isinstance(args.get("city"), str):
                return f"bad call {name}({arguments[:80]})"
    return None


class Mix:
    """Request bodies of every kind, drawn with one seeded generator per client task."""

    def __init__(self, model: str, prefix_len: int, max_tokens: int, seed: int) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.system = shared_prefix(prefix_len, seed)
        self.rng = random.Random(seed)

    def gen(self, **extra) -> dict:
        r = self.rng
        temperature = r.choice([0.0, 0.8])
        sampling = {
            "temperature": temperature,
            **({"seed": r.randrange(1 << 30)} if temperature else {}),
        }
        return {
            "model": self.model,
            "max_tokens": r.randint(8, self.max_tokens),
            **sampling,
            **extra,
        }

    def user(self) -> str:
        words = word_text(self.rng.randint(8, 40), self.rng)
        return f"{self.rng.randrange(10**6)} Continue: {words}"

    def chat(self, stream: bool, system: str | None = None, **extra) -> dict:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": self.user()})
        return self.gen(messages=messages, **self.streaming(stream), **extra)

    def text(self, stream: bool, **extra) -> dict:
        return self.gen(prompt=self.user(), **self.streaming(stream), **extra)

    def streaming(self, stream: bool) -> dict:
        usage = self.rng.random() < 0.5
        return {"stream": True, **({"stream_options": {"include_usage": True}} if usage else {})
                } if stream else {}  # fmt: skip

    def coin(self) -> bool:
        return self.rng.random() < 0.5

    # ------------------------------------------------------------ one method per kind

    def chat_plain(self) -> Spec:
        return Spec("chat_plain", CHAT, self.chat(False))

    def chat_stream(self) -> Spec:
        return Spec("chat_stream", CHAT, self.chat(True), stream=True)

    def text_plain(self) -> Spec:
        return Spec("text_plain", TEXT, self.text(False))

    def text_stream(self) -> Spec:
        return Spec("text_stream", TEXT, self.text(True), stream=True)

    def n2(self) -> Spec:
        stream = self.coin()
        body = self.chat(stream, n=2) if self.coin() else self.text(stream, n=2)
        return Spec("n2", CHAT if "messages" in body else TEXT, body, stream=stream, n=2)

    def shared_prefix(self) -> Spec:
        stream = self.coin()
        return Spec("shared_prefix", CHAT, self.chat(stream, self.system), stream=stream)

    def json_schema(self) -> Spec:
        stream = self.coin()
        fmt = {"type": "json_schema", "json_schema": {"name": "named", "schema": NAME_SCHEMA}}
        body = self.chat(stream, response_format=fmt)
        body["messages"][-1]["content"] = "Name a " + body["messages"][-1]["content"]
        return Spec("json_schema", CHAT, body, stream=stream, check=json_named)

    def tool_required(self) -> Spec:
        stream = self.coin()
        body = self.chat(stream, tools=[WEATHER], tool_choice="required")
        body["messages"][-1]["content"] = f"Weather in city {self.rng.randrange(100)}?"
        return Spec("tool_required", CHAT, body, stream=stream, check=forced_tool)

    def stop(self) -> Spec:
        stream = self.coin()
        body = self.text(stream, stop=STOPS) if self.coin() else self.chat(stream, stop=STOPS)
        path = CHAT if "messages" in body else TEXT
        return Spec("stop", path, body, stream=stream, check=no_stop_string)

    def hang_up(self) -> Spec:
        """A client that goes away: after 1-3 chunks, or 0.2-1.5 s into a plain request."""
        if self.coin():
            body = self.chat(True, max_tokens=self.max_tokens)
            return Spec("hang_up", CHAT, body, stream=True, hang_up=self.rng.randint(1, 3))
        return Spec("hang_up", TEXT, self.text(False, max_tokens=self.max_tokens),
                    hang_up=self.rng.uniform(0.2, 1.5))  # fmt: skip

    def bad(self) -> Spec:
        m, msgs = self.model, [{"role": "user", "content": "Hello"}]
        bodies: list[tuple[str, dict | bytes]] = [
            (TEXT, {"model": "no-such-model", "prompt": "Hi", "max_tokens": 8}),
            (TEXT, {"model": m, "prompt": "Hi", "temperature": -1, "max_tokens": 8}),
            (TEXT, {"model": m, "prompt": "Hi", "max_tokens": 100_000}),
            (TEXT, {"model": m, "prompt": word_text(2100, self.rng), "max_tokens": 8}),
            (CHAT, {"model": m, "messages": [], "max_tokens": 8}),
            (CHAT, {"model": m, "messages": msgs, "tool_choice": "required", "max_tokens": 8}),
            (CHAT, {"model": m, "messages": msgs, "n": 0}),
            (CHAT, b'{"model": "x", "messages": [{"role": '),
        ]
        path, body = self.rng.choice(bodies)
        stream = self.coin() and isinstance(body, dict)
        body = {**body, "stream": True} if stream else body
        return Spec("bad", path, body, stream=stream, bad=True)

    def make(self, kind: str) -> Spec:
        return getattr(self, kind)()


# NOTE: kind -> weight; each kind is a Mix method of the same name.
KINDS = {"chat_plain": 2, "chat_stream": 3, "text_plain": 2, "text_stream": 2, "n2": 1,
         "shared_prefix": 2, "json_schema": 1, "tool_required": 1, "stop": 1, "hang_up": 1,
         "bad": 1}  # fmt: skip


class Deck:
    """The kinds in shuffled rounds, shared by all client tasks: the first round holds each
    kind once (so even a short run sees them all), the next ones `weight` cards of each."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.cards = list(KINDS)
        self.rng.shuffle(self.cards)
        self.dealt = 0

    @property
    def every_kind_dealt(self) -> bool:
        return self.dealt >= len(KINDS)

    def draw(self) -> str:
        self.dealt += 1
        if not self.cards:
            self.cards = [k for k, weight in KINDS.items() for _ in range(weight)]
            self.rng.shuffle(self.cards)
        return self.cards.pop()
