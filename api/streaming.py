"""Engine deltas of one HTTP request: merging several engine requests, accumulating results.

A /v1/completions batch is one engine request per prompt; their deltas interleave here.
NOTE: every engine iterator opened for an HTTP request is closed by `DeltaStream.aclose`
(a `finally` on every path, client disconnects included): closing an unfinished iterator is
what makes the engine client abort the request and free its blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from actors.protocol import TextDelta, TokenLogprob
from api.errors import ApiError

log = logging.getLogger(__name__)

DeltaObserver = Callable[[int, TextDelta], None]


class DeltaStream:
    """The deltas of one or more engine requests (one per prompt) as (source, delta) pairs.

    `open()` awaits every source's first delta, so a refusal (an `EngineRequestError` from the
    engine client) surfaces before any response header is sent.
    """

    def __init__(
        self, iterators: list[AsyncIterator[TextDelta]], on_delta: DeltaObserver | None = None
    ) -> None:
        self._iterators = iterators
        self._on_delta = on_delta
        self._firsts: list[TextDelta | None] = []
        self._pumps: list[asyncio.Task] = []
        self._closed = False

    async def open(self) -> None:
        """Wait for the first delta of every source; on any failure close all and raise."""
        try:
            if len(self._iterators) == 1:
                results = [await _first(self._iterators[0])]
            else:
                firsts = (_first(it) for it in self._iterators)
                results = await asyncio.gather(*firsts, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise next((e for e in errors if isinstance(e, ApiError)), errors[0])
            self._firsts = results
            for src, delta in enumerate(results):
                if delta is not None and self._on_delta is not None:
                    self._on_delta(src, delta)
        except BaseException:
            await self.aclose()
            raise

    async def events(self) -> AsyncIterator[tuple[int, TextDelta]]:
        """Every delta once, in arrival order; raises what an engine iterator raised."""
        for src, delta in enumerate(self._firsts):
            if delta is not None:
                yield src, delta  # observed in open(), when it arrived
        live = [src for src, delta in enumerate(self._firsts) if delta is not None]
        if len(self._iterators) == 1 and live:
            async for delta in self._iterators[0]:
                yield self._observe(0, delta)
            return
        queue: asyncio.Queue = asyncio.Queue()
        self._pumps = [asyncio.create_task(_pump(s, self._iterators[s], queue)) for s in live]
        remaining = len(live)
        while remaining:
            src, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield self._observe(src, item)

    def _observe(self, src: int, delta: TextDelta) -> tuple[int, TextDelta]:
        if self._on_delta is not None:
            self._on_delta(src, delta)
        return src, delta

    async def aclose(self) -> None:
        """Close every engine iterator (aborting unfinished requests); idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for it in self._iterators:
            aclose = getattr(it, "aclose", None)
            if aclose is None:
                continue
            try:
                await aclose()
            except RuntimeError:  # still running in a task being cancelled: it aborts itself
                pass
            except Exception:
                log.exception("closing an engine stream failed")


async def _first(it: AsyncIterator[TextDelta]) -> TextDelta | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _pump(src: int, it: AsyncIterator[TextDelta], queue: asyncio.Queue) -> None:
    try:
        async for delta in it:
            queue.put_nowait((src, delta))
    except Exception as e:
        queue.put_nowait((src, e))
        return
    queue.put_nowait((src, None))


@dataclass
class Choice:
    """What one sample (choice) produced so far."""

    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_output_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.texts)


class Accumulator:
    """Per-choice results and usage of an HTTP request made of `num_sources` engine requests."""

    def __init__(self, num_sources: int, n: int) -> None:
        self.n = n
        self.choices = [Choice(i) for i in range(num_sources * n)]
        self.prompt_tokens = [0] * num_sources
        self.cached_tokens = [0] * num_sources
        self.gpu_seconds = [0.0] * num_sources  # each engine request's device time so far

    def choice_index(self, src: int, delta: TextDelta) -> int:
        return src * self.n + delta.index

    def add(self, src: int, delta: TextDelta, keep: bool = True) -> Choice:
        """Count a delta; with `keep`, also keep its text, ids and logprobs (non-streamed)."""
        choice = self.choices[self.choice_index(src, delta)]
        self.prompt_tokens[src] = max(self.prompt_tokens[src], delta.num_prompt_tokens)
        self.cached_tokens[src] = max(self.cached_tokens[src], delta.num_cached_tokens)
        self.gpu_seconds[src] = max(self.gpu_seconds[src], delta.gpu_seconds)
        if delta.num_output_tokens:
            choice.num_output_tokens = delta.num_output_tokens
        else:
            choice.num_output_tokens += len(delta.token_ids)
        if keep:
            choice.texts.append(delta.text)
            choice.token_ids.extend(delta.token_ids)
            if delta.logprobs:
                choice.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason
        if delta.finish_reason == "error":
            raise ApiError(500, "The engine failed while generating this request.")
        return choice

    def source_output_tokens(self, src: int) -> int:
        """Tokens generated by engine request `src` (all its samples)."""
        return sum(c.num_output_tokens for c in self.choices[src * self.n : (src + 1) * self.n])

    def usage(self) -> dict:
        """OpenAI's usage object, with vLLM's prompt_tokens_details.cached_tokens and
        tokenmill's `gpu_seconds` (the device time the request was charged)."""
        prompt = sum(self.prompt_tokens)
        completion = sum(c.num_output_tokens for c in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens)},
            "gpu_seconds": sum(self.gpu_seconds),
        }
