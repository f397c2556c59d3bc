"""Compiled grammars of one model: xgrammar's compiler, an LRU cache with a byte cap, pins.

The cache is keyed by `GrammarSpec` (kind + text + strictness). Entries that a live request
has pinned are never evicted; the others go least recently used first once the cache holds
more than `max_bytes`. Every method is thread-safe: compiles run in a worker pool while the
model step reads the cache.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import msgspec
import xgrammar as xgr

from model_runner.sampling_params import GrammarSpec

log = logging.getLogger(__name__)

DEFAULT_GRAMMAR_CACHE_BYTES = 512 * 1024 * 1024
_XGR_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """A grammar spec that xgrammar refuses (bad schema, regex, EBNF, structural tag)."""


class GrammarCacheStats(msgspec.Struct, frozen=True, kw_only=True):
    """Cumulative counters of one engine's grammar cache."""

    compiles: int = 0  # grammars compiled (cache misses), failures included
    compile_seconds: float = 0.0  # wall time of those compiles
    cache_hits: int = 0  # compile requests answered from the cache
    cache_bytes: int = 0  # memory of the compiled grammars held now
    cache_entries: int = 0


def xgrammar_message(error: Exception) -> str:
    """xgrammar's error text without its timestamp and C++ source location."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return _XGR_PREFIX.sub("", lines[0] if lines else type(error).__name__)


# xgrammar 0.2.9 writes a JSON string with minLength/maxLength as `"` chars{m, n} `"` over
# the class [^"\\\r\n], which lets raw control characters (a tab) in: not JSON. The fix
# swaps in the class of its unbounded strings; test_schema_enforcement.py holds it to it.
_LOOSE_LENGTH_CLASS = re.compile(r"^(\S+) ::= " + re.escape(r"(([^\"\\\r\n]))") + "$", re.M)
_JSON_CHARACTER_CLASS = r"(([^\"\\\x00-\x1f]))"


def grammar_of(spec: GrammarSpec) -> xgr.Grammar:
    """The xgrammar Grammar of a spec (no tokenizer needed); raises GrammarError.

    NOTE: JSON is generated compactly (`any_whitespace=False`): a small model cannot pad its
    output with endless whitespace, and `", "`/`": "` separators keep the text readable.
    """
    try:
        match spec.kind:
            case "json_schema":
                grammar = xgr.Grammar.from_json_schema(
                    spec.spec, any_whitespace=False, strict_mode=spec.strict
                )
            case "json_object":
                grammar = xgr.Grammar.from_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            case "regex":
                return xgr.Grammar.from_regex(spec.spec)
            case "ebnf":
                return xgr.Grammar.from_ebnf(spec.spec)
            case "structural_tag":
                grammar = xgr.Grammar.from_structural_tag(spec.spec)
            case _:
                raise GrammarError(f"unknown grammar kind {spec.kind!r}")
        return _json_strings_without_control_characters(grammar, spec)
    except GrammarError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError and its own error classes
        raise GrammarError(xgrammar_message(e)) from None


def _json_strings_without_control_characters(grammar: xgr.Grammar, spec: GrammarSpec):
    if "Length" not in spec.spec:  # NOTE: only length-bounded strings have the loose class
        return grammar
    text, count = _LOOSE_LENGTH_CLASS.subn(
        lambda m: f"{m.group(1)} ::= {_JSON_CHARACTER_CLASS}", str(grammar)
    )
    return xgr.Grammar.from_ebnf(text) if count else grammar


def compile_spec(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
    """Compile one spec into token masks for the compiler's vocabulary; raises GrammarError."""
    grammar = grammar_of(spec)
    try:
        return compiler.compile_grammar(grammar)
    except Exception as e:
        raise GrammarError(xgrammar_message(e)) from None


@dataclass
class _Entry:
    compiled: xgr.CompiledGrammar
    nbytes: int


def default_compile_threads() -> int:
    """xgrammar's compile threads: a quarter of the cores (1 on a 2-core machine), at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def hf_tokenizer_info(
    tokenizer, vocab_size: int, stop_token_ids: Sequence[int]
) -> xgr.TokenizerInfo:
    """What xgrammar needs of an HF tokenizer: its vocabulary, padded to the model's."""
    return xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
    )


class GrammarCache:
    """The model's GrammarCompiler (built on first use, from `info_loader`) and its grammars."""

    def __init__(
        self,
        info_loader: Callable[[], xgr.TokenizerInfo],
        max_bytes: int = DEFAULT_GRAMMAR_CACHE_BYTES,
        compile_threads: int | None = None,
    ) -> None:
        self._load_info = info_loader
        self.max_bytes = max_bytes
        self.compile_threads = compile_threads or default_compile_threads()
        self._lock = threading.Lock()
        self._compiler_lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._entries: OrderedDict[GrammarSpec, _Entry] = OrderedDict()
        self._inflight: dict[GrammarSpec, Future] = {}
        self._pins: dict[str, GrammarSpec] = {}
        self._bytes = 0
        self._compiles = 0
        self._compile_seconds = 0.0
        self._hits = 0

    # --- compiler ---------------------------------------------------------------------

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        """Built once, on first use (the tokenizer loads then)."""
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = xgr.GrammarCompiler(
                    self._load_info(), max_threads=self.compile_threads, cache_enabled=False
                )
            return self._compiler

    # --- compile and look up ------------------------------------------------------------

    def compile(self, spec: GrammarSpec) -> tuple[xgr.CompiledGrammar, bool]:
        """(compiled grammar, whether it came from the cache); raises GrammarError.

        Concurrent calls for one spec compile it once; the others wait for that compile.
        """
        with self._lock:
            entry = self._entries.get(spec)
            if entry is not None:
                self._entries.move_to_end(spec)
                self._hits += 1
                return entry.compiled, True
            waiting = self._inflight.get(spec)
            if waiting is None:
                self._inflight[spec] = Future()
        if waiting is not None:
            compiled = waiting.result()  # NOTE: re-raises the compiling thread's GrammarError
            with self._lock:
                self._hits += 1
            return compiled, True
        return self._compile_new(spec), False

    def _compile_new(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        start = time.perf_counter()
        try:
            compiled = compile_spec(self.compiler, spec)
        except BaseException as e:
            self._finish_compile(spec, time.perf_counter() - start, None)
            self._inflight_done(spec, error=e)
            raise
        self._finish_compile(spec, time.perf_counter() - start, compiled)
        self._inflight_done(spec, result=compiled)
        return compiled

    def _finish_compile(
        self, spec: GrammarSpec, seconds: float, compiled: xgr.CompiledGrammar | None
    ) -> None:
        with self._lock:
            self._compiles += 1
            self._compile_seconds += seconds
            if compiled is not None:
                nbytes = int(compiled.memory_size_bytes)
                self._entries[spec] = _Entry(compiled, nbytes)
                self._bytes += nbytes
                self._evict()

    def _inflight_done(self, spec: GrammarSpec, result=None, error=None) -> None:
        with self._lock:
            future = self._inflight.pop(spec)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def get(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec` for a sequence (not counted as a cache hit: its
        request's compile was); compiled here if it is not cached."""
        with self._lock:
            entry = self._entries.get(spec)
            if entry is not None:
                self._entries.move_to_end(spec)
                return entry.compiled
        return self.compile(spec)[0]

    # --- pins and eviction ------------------------------------------------------------

    def pin(self, owner: str, spec: GrammarSpec) -> None:
        """Keep `spec` cached while `owner` (a request id) may still start sequences."""
        with self._lock:
            self._pins[owner] = spec

    def num_pinned(self) -> int:
        """Requests holding a pin (0 once every grammar request finished)."""
        with self._lock:
            return len(self._pins)

    def unpin(self, owner: str) -> None:
        with self._lock:
            if self._pins.pop(owner, None) is not None:
                self._evict()

    def _evict(self) -> None:
        """Drop least recently used unpinned entries while over the byte cap (lock held).

        NOTE: never the most recent entry: a grammar just compiled is about to be pinned.
        """
        if self._bytes <= self.max_bytes:
            return
        pinned = set(self._pins.values())
        for spec in list(self._entries)[:-1]:
            if self._bytes <= self.max_bytes:
                break
            if spec in pinned:
                continue
            self._bytes -= self._entries.pop(spec).nbytes

    def stats(self) -> GrammarCacheStats:
        with self._lock:
            return GrammarCacheStats(
                compiles=self._compiles,
                compile_seconds=self._compile_seconds,
                cache_hits=self._hits,
                cache_bytes=self._bytes,
                cache_entries=len(self._entries),
            )

    def __contains__(self, spec: GrammarSpec) -> bool:
        with self._lock:
            return spec in self._entries
