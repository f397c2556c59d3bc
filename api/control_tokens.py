"""Control-token spellings in client data stay text.

Before a chat is rendered, every spelling of one of the tokenizer's added tokens
(`<|im_end|>`, `</s>`, ...) inside client data (message contents of every role, names, tool
calls and their arguments, tool results, tool definitions, documents, template kwargs) is
replaced by a per-request placeholder: private-use characters around a random nonce, which
a client cannot guess and a template does not change (no whitespace, no letters). After
rendering, each placeholder is turned back into its spelling and the spelling's character
span is recorded; the tokenizer encodes those spans as plain text (`actors.prompt_encoding`).
NOTE: not covered are tokens a template assembles from pieces of client text and its own
(`'<|' + role + '|>'`); roles are checked against a fixed list.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from api.errors import bad_request

_PUA = 0xF0000  # Supplementary Private Use Area-A: never produced by any tokenizer's text
_OPEN, _CLOSE = chr(_PUA), chr(_PUA + 1)
_DIGITS = "".join(chr(_PUA + 16 + d) for d in range(16))
_NONCE_CHARS = 16  # 64 random bits


def _pua_hex(n: int) -> str:
    return "".join(_DIGITS[int(d, 16)] for d in f"{n:x}")


class ControlTokenSpellings:
    """The added tokens of one tokenizer, longest first (a token wins over its prefixes).
    Whitespace-only added tokens (Gemma's newlines) are ordinary text in templates too."""

    def __init__(self, tokenizer) -> None:
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        contents = {t.content for t in decoder.values() if t.content and not t.content.isspace()}
        self.spellings = sorted(contents, key=lambda s: (-len(s), s))
        self.pattern = re.compile("|".join(map(re.escape, self.spellings))) if contents else None

    def masker(self) -> SpellingMask | None:
        """A fresh mask for one request (None: this tokenizer has no control tokens)."""
        return SpellingMask(self) if self.pattern is not None else None


class SpellingMask:
    """One request's placeholders: `mask` before rendering, `unmask` after."""

    def __init__(self, spellings: ControlTokenSpellings) -> None:
        self.spellings = spellings
        self.nonce = "".join(secrets.choice(_DIGITS) for _ in range(_NONCE_CHARS))
        self.index = {s: i for i, s in enumerate(spellings.spellings)}
        self.found = False
        self.placeholder = re.compile(
            re.escape(_OPEN + self.nonce) + f"([{re.escape(_DIGITS)}]+)" + re.escape(_CLOSE)
        )

    def mask(self, value: Any) -> Any:
        """`value` with every spelling in its strings (dict keys too) made a placeholder."""
        if isinstance(value, str):
            return self.spellings.pattern.sub(self._placeholder, value)
        if isinstance(value, dict):
            return {self.mask(k): self.mask(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mask(v) for v in value]
        return value

    def _placeholder(self, match: re.Match) -> str:
        self.found = True
        return _OPEN + self.nonce + _pua_hex(self.index[match.group()]) + _CLOSE

    def unmask(self, rendered: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text with the spellings back, and their spans in it."""
        if not self.found:
            return rendered, []
        out: list[str] = []
        spans: list[tuple[int, int]] = []
        size = last = 0
        for m in self.placeholder.finditer(rendered):
            spelling = self.spellings.spellings[int(_hex_of(m.group(1)), 16)]
            out.append(rendered[last : m.start()])
            size += m.start() - last
            out.append(spelling)
            spans.append((size, size + len(spelling)))
            size += len(spelling)
            last = m.end()
        out.append(rendered[last:])
        text = "".join(out)
        if self.nonce[:8] in text:
            raise bad_request(
                "The chat template cut apart text that spells a control token.", "messages"
            )
        return text, spans


def _hex_of(pua_digits: str) -> str:
    return "".join(f"{ord(c) - _PUA - 16:x}" for c in pua_digits)
