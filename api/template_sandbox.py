"""A request's own chat template, rendered in a bounded Jinja sandbox.

`jinja2.sandbox.ImmutableSandboxedEnvironment` (as transformers uses for every chat template)
stops a template from reaching Python internals (`''.__class__`, `cycler.__init__`, ...) or
mutating its inputs. On top of it a render here has a time limit and an output-size limit:
NOTE: a thread cannot be killed, so the render stops itself. Every attribute read, item
read, call, arithmetic operator and loop step checks the deadline; calls, reads and
operators refuse values past the size limit before building them where that is possible
(`*`, `center`, `replace`, `join`, ...), and the output is counted as it is generated.
The caller runs the render in a worker thread, so the event loop never waits on it.
"""

from __future__ import annotations

import json
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_TIMEOUT_S = 1.0  # wall time one render of a request's template may take
MAX_RENDER_CHARS = 4 * 1024 * 1024  # characters of output, and of any one value built on the way
MAX_TEMPLATE_CHARS = 256 * 1024  # the template text itself (real chat templates are < 40 KiB)
_CHECK_EVERY = 256  # loop steps between deadline checks


class TemplateLimitError(Exception):
    """The render ran past its time or size limit."""


@dataclass
class _Budget:
    deadline: float
    chars_left: int = MAX_RENDER_CHARS

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the chat template took longer than {RENDER_TIMEOUT_S} s")

    def spend(self, chars: int) -> None:
        self.chars_left -= chars
        if self.chars_left < 0:
            raise TemplateLimitError(_too_big())


_budget: ContextVar[_Budget] = ContextVar("template_render_budget")


def _too_big() -> str:
    return f"the chat template built more than {MAX_RENDER_CHARS} characters"


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _check_size(value: Any) -> Any:
    if _size(value) > MAX_RENDER_CHARS:
        raise TemplateLimitError(_too_big())
    return value


def _check_bound(n: Any) -> None:
    if isinstance(n, int) and n > MAX_RENDER_CHARS:
        raise TemplateLimitError(_too_big())


def _text_size(items: Any) -> int:
    return sum(len(x) if isinstance(x, str) else 16 for x in items)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with the per-render budget checked at every hook Jinja offers."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _budget.get().check_time()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_bound(n * (len(seq) if isinstance(seq, str) else _text_size(seq)))
        elif operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise TemplateLimitError("the chat template raised a number to a too large power")
        elif operator == "%" and isinstance(left, str):
            _check_format_widths(left)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        _budget.get().check_time()
        for value in (*args, *kwargs.values()):
            _check_size(value)
        if isinstance(__obj, jinja2.utils.Cycler) or __obj is jinja2.utils.generate_lorem_ipsum:
            raise jinja2.exceptions.SecurityError(f"{__obj!r} is not available to chat templates")
        if getattr(__obj, "__name__", None) in ("format", "format_map"):
            _check_format_widths(getattr(__obj, "__self__", ""))
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def unsafe_undefined(self, obj: Any, attribute: str):
        """Reaching for an unsafe attribute fails the render (Jinja's own sandbox would
        hand back an undefined value that prints as nothing)."""
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget.get().check_time()
        return _check_size(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget.get().check_time()
        return _check_size(super().getitem(obj, argument))


_WIDTH = re.compile(r"(\d{7,})")  # a width or precision of a million or more


def _check_format_widths(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDTH.search(fmt):
        raise TemplateLimitError(_too_big())


def _budgeted(iterable):
    """Every `{% for %}` iterates through this (see `_bounded_loops`)."""
    budget = _budget.get()
    for i, item in enumerate(iterable):
        if i % _CHECK_EVERY == 0:
            budget.check_time()
        yield item


def _bounded_loops(ast: jinja2.nodes.Template) -> jinja2.nodes.Template:
    for loop in ast.find_all(jinja2.nodes.For):
        loop.iter = jinja2.nodes.Filter(loop.iter, "_budgeted", [], [], None, None)
        loop.iter.set_lineno(loop.lineno)
    return ast


def _bounded_filter(filter_fn, size_of_result):
    def bounded(*args, **kwargs):
        _check_bound(size_of_result(*args, **kwargs))
        return filter_fn(*args, **kwargs)

    return bounded


def _replace_size(s, old="", new="", count=None, *_):
    s, old, new = str(s), str(old), str(new)
    return len(s) + (len(s) + 1) * len(new) if not old else len(s) + s.count(old) * len(new)


def _indent_size(s, width=4, *_, **__):
    return (len(str(s)) + 1) * (width if isinstance(width, int) else len(str(width)))


def _join_size(value, d="", *_, **__):
    items = list(value) if not isinstance(value, (list, tuple, str)) else value
    return _text_size(items) + len(items) * len(str(d))


# transformers' chat-template helpers, so a template renders here as it does there
def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` without the class itself (as in transformers)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` without underscore-prefixed attributes (as in transformers)."""

    def __init__(*args, **kwargs):  # noqa: N805 (Jinja's Namespace signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _environment() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters["_budgeted"] = _budgeted
    for name, size in (
        ("center", lambda value, width=80: width),
        ("indent", _indent_size),
        ("wordwrap", lambda s, width=79, *a, **k: 2 * len(str(s))),
        ("replace", _replace_size),
        ("join", _join_size),
    ):
        env.filters[name] = _bounded_filter(env.filters[name], size)
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        namespace=_Namespace,
        dict=_Dict(),
    )
    del env.globals["lipsum"], env.globals["cycler"], env.globals["joiner"]
    return env


_ENV = _environment()


@lru_cache(maxsize=32)
def _compiled(template: str) -> jinja2.Template:
    return _ENV.from_string(_bounded_loops(_ENV.parse(template)))


def render_request_template(template: str, context: dict[str, Any]) -> str:
    """Render a request's template with `context`, within the limits above. Raises
    TemplateLimitError, jinja2's SecurityError or any error the template raises."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateLimitError(
            f"the chat template is longer than {MAX_TEMPLATE_CHARS} characters"
        )
    budget = _Budget(deadline=time.monotonic() + RENDER_TIMEOUT_S)
    token = _budget.set(budget)
    try:
        compiled = _compiled(template)
        chunks = []
        for chunk in compiled.generate(**context):
            budget.check_time()
            budget.spend(len(chunk))
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _budget.reset(token)
