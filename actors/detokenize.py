"""Incremental detokenization of one sample: token ids -> UTF-8-safe text deltas, stop strings.

Pure logic (no asyncio, no sockets); the detokenizer actor keeps one `IncrementalDetokenizer`
per sample. Decoding uses the prefix_offset/read_offset window of HF TGI and vLLM over the
Rust tokenizer, so each step decodes a few tokens, never the whole sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token (as vLLM)
_TRIM_AT = 64  # drop decoded ids before the window once this many have piled up


def backend_of(tokenizer: Any) -> Any:
    """The Rust `tokenizers.Tokenizer` behind an HF fast tokenizer (or the tokenizer itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display strings of single tokens, for logprobs (special tokens shown, as vLLM does).

    A token holding only part of a multi-byte character shows as U+FFFD, like vLLM.
    """
    return backend_of(tokenizer).decode_batch([[i] for i in ids], skip_special_tokens=False)


class _StopMatcher:
    """Finds stop strings in a text stream and holds back what could still start one."""

    def __init__(self, stop: Iterable[str], include_stop_str_in_output: bool) -> None:
        # NOTE: an empty stop string would match everywhere; the API rejects it, we ignore it.
        self.stops = tuple(dict.fromkeys(s for s in stop if s))
        self.include = include_stop_str_in_output
        longest = max((len(s) for s in self.stops), default=0)
        self.keep = max(longest - 1, 0)  # chars of context a match may reach back into
        self.prefixes = {s[:k] for s in self.stops for k in range(1, len(s))}
        self.prefix_last_chars = {p[-1] for p in self.prefixes}
        self.tail = ""  # last `keep` chars of the text so far, emitted or held
        self.held = 0  # how many chars at the end of `tail` are not emitted yet

    def feed(self, text: str, final: bool = False) -> tuple[str, str | None]:
        """Returns (text now safe to emit, the stop string hit or None).

        NOTE: `tail` never contains a whole stop string (it would have matched already), so a
        new match ends inside `text`; held chars are a suffix of `tail`.
        """
        buf = self.tail + text
        emitted_upto = len(self.tail) - self.held
        hit = self._first_match(buf)
        if hit is not None:
            start, stop = hit
            end = start + len(stop) if self.include else start
            return buf[emitted_upto:end], stop
        hold = 0 if final or self.include else self._held_suffix(buf)
        hold = min(hold, len(buf) - emitted_upto)
        self.tail = buf[-self.keep :] if self.keep else ""
        self.held = min(hold, len(self.tail))
        return buf[emitted_upto : len(buf) - hold], None

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        """The stop string completed first (then the one starting first), as a stream sees it."""
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0 and (best is None or (i + len(stop), i) < best[:2]):
                best = (i + len(stop), i, stop)
        return None if best is None else (best[1], best[2])

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        if not buf or buf[-1] not in self.prefix_last_chars:
            return 0
        for k in range(min(self.keep, len(buf)), 0, -1):
            if buf[-k:] in self.prefixes:
                return k
        return 0


class IncrementalDetokenizer:
    """Turns one sample's output token ids into text deltas.

    Invariants, for any split of the ids into `add` calls followed by `finish()`:
    - without stop strings, the concatenated deltas equal
      `tokenizer.decode(output_ids, skip_special_tokens=...)` (with `prompt_token_ids` given:
      the text that the output ids add after the prompt's last tokens), less the U+FFFD
      that decoding puts at the very end for a character the sample never completed;
    - no delta ends inside a multi-byte character: text decoding to a trailing U+FFFD is held
      back until a later token completes it, and `finish()` drops what never completed (a
      generation cut by max_tokens or a stop token inside a character ends on its last whole
      character, never on U+FFFD). NOTE: a sample whose last character really is U+FFFD
      loses it too; bytes cannot be told from text after decoding;
    - a stop string is never emitted unless `include_stop_str_in_output`, also when it spans
      several tokens; text after the first stop string is dropped.

    One exception, only for invalid UTF-8 (garbage ids): a byte-fallback tokenizer decodes a
    run of byte tokens that is invalid as a whole to U+FFFD per byte, also those bytes that
    formed valid characters earlier; their deltas keep those characters.

    NOTE: `clean_up_tokenization_spaces` (a WordPiece-era option, off for LLM tokenizers) is
    not applied.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> None:
        self._backend = backend_of(tokenizer)
        self._skip = skip_special_tokens
        matcher = _StopMatcher(stop, include_stop_str_in_output)
        self._stops = matcher if matcher.stops else None
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: ids decoded only as context
        self._read_offset = 0  # ids before this are already turned into text
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self.stopped_on: str | None = None
        self.finished = False
        if prompt_token_ids:
            self._prime(list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]))

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

    def _prime(self, context: list[int]) -> None:
        text = self._decode(context)
        if text.endswith(REPLACEMENT_CHAR):
            return  # NOTE: a prompt ending mid-character gives no stable prefix: no context
        self._ids = context
        self._read_offset = len(context)
        self._prefix_text = text

    @property
    def done(self) -> bool:
        """True once a stop string matched or `finish()` ran; later tokens are ignored."""
        return self.finished or self.stopped_on is not None

    def add(self, token_ids: Sequence[int]) -> tuple[str, str | None]:
        """Append new output tokens; returns (text delta, the stop string hit or None)."""
        if self.done or not token_ids:
            return "", None
        self._ids.extend(token_ids)
        return self._filter(self._decode_new(final=False))

    def finish(self) -> str:
        """The sample ended (EOS, length, stop token): flush everything held back."""
        if self.done:
            return ""
        text = self._decode_new(final=True).rstrip(REPLACEMENT_CHAR)
        self.finished = True
        if self._stops is None:
            return text
        delta, self.stopped_on = self._stops.feed(text, final=True)
        return delta

    def _filter(self, text: str) -> tuple[str, str | None]:
        if self._stops is None:
            return text, None
        delta, self.stopped_on = self._stops.feed(text)
        return delta, self.stopped_on

    def _decode_new(self, final: bool) -> str:
        """Text of the ids past read_offset, or "" while it would end mid-character."""
        if self._read_offset >= len(self._ids):
            return ""
        text = self._decode(self._ids[self._prefix_offset :])
        prefix_len = len(self._prefix_text)
        if not final and (len(text) <= prefix_len or text.endswith(REPLACEMENT_CHAR)):
            return ""
        new_text = text[prefix_len:]
        self._advance()
        return new_text

    def _advance(self) -> None:
        # NOTE: read_offset only moves to a token boundary whose text ended on a whole
        # character, so every window starts on a character boundary.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset >= _TRIM_AT:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Display strings of single tokens (for logprobs)."""
        return token_texts(self._backend, ids)
