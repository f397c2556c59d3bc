"""Prompt text -> token ids, with client-supplied control-token spellings kept as text.

A rendered chat holds the template's control tokens (`<|im_start|>`, ...) and the client's
text. Where the client's text spells a control token, the API sends that spelling's
character span (`literal_spans`); those spans are encoded with no added tokens at all, so
only the template's own markup becomes control-token ids.
NOTE: with no literal spans the ids are exactly `tokenizer(text)`'s, as before spans existed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

Span = tuple[int, int]


class BadLiteralSpans(ValueError):
    """Spans that are unsorted, overlapping, empty or outside the prompt."""


def check_spans(text: str, spans: Sequence[Span]) -> None:
    end = 0
    for start, stop in spans:
        if not end <= start < stop <= len(text):
            raise BadLiteralSpans(f"bad literal span ({start}, {stop}) in {len(text)} characters")
        end = stop


class PromptEncoder:
    """Encodes prompts for one tokenizer; safe to share between threads."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._backend = _fast_backend(tokenizer)
        self._lock = threading.Lock()  # NOTE: only the slow fallback flips tokenizer state
        self._newline_ids = self._encode_text("\n")

    def encode(
        self, text: str, *, add_special_tokens: bool, literal_spans: Sequence[Span] | None = None
    ) -> list[int]:
        if not literal_spans:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        check_spans(text, literal_spans)
        ids = self._encode_markup(text[: literal_spans[0][0]])
        for i, (start, stop) in enumerate(literal_spans):
            ids += self._encode_inner(text[start:stop], as_text=True)
            after = literal_spans[i + 1][0] if i + 1 < len(literal_spans) else len(text)
            if after > stop:
                ids += self._encode_inner(text[stop:after], as_text=False)
        if add_special_tokens:
            ids = list(self.tokenizer.build_inputs_with_special_tokens(ids))
        return ids

    def _encode_markup(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _encode_text(self, text: str) -> list[int]:
        """`text` as plain text: no added token (special or not) is matched in it."""
        if (b := self._backend) is not None:  # the backend's pipeline minus its added tokens
            if b.normalizer is not None:
                text = b.normalizer.normalize_str(text)
            splits = (
                [s for s, _ in b.pre_tokenizer.pre_tokenize_str(text)]
                if b.pre_tokenizer
                else [text]
            )
            return [token.id for split in splits for token in b.model.tokenize(split)]
        with self._lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False,
                                              split_special_tokens=True))  # fmt: skip

    def _encode_inner(self, piece: str, *, as_text: bool) -> list[int]:
        """A piece from the middle of the prompt. Encoded after a newline that is then cut
        off, so a SentencePiece tokenizer adds no start-of-text prefix space (the trick
        transformers' own control-token sanitizing uses)."""
        encode = self._encode_text if as_text else self._encode_markup
        ids = encode("\n" + piece)
        n = len(self._newline_ids)
        return ids[n:] if ids[:n] == self._newline_ids else encode(piece)


def _fast_backend(tokenizer):
    """A fast tokenizer's `tokenizers.Tokenizer` (read only here), or None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend if hasattr(backend, "pre_tokenizer") and hasattr(backend, "model") else None
