"""The detokenizer actor: token ids -> text deltas, stop strings, one batch per step."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import msgspec

from actors.actor import Actor
from actors.detokenize import IncrementalDetokenizer, token_texts
from actors.protocol import (
    Abort,
    DetokParams,
    SeqOutput,
    StepTokens,
    TextDelta,
    TextDeltas,
    TokenLogprob,
)
from actors.transport import Transport


@dataclass
class _Sample:
    params: DetokParams
    decoder: IncrementalDetokenizer | None  # None: no tokenizer, token ids only
    num_output_tokens: int = 0
    done: bool = False


@dataclass
class _Request:
    params: DetokParams
    samples: dict[int, _Sample] = field(default_factory=dict)


class DetokenizerActor(Actor):
    name = "detokenizer"

    def __init__(self, transport: Transport, tokenizer_loader) -> None:
        super().__init__(transport)
        self.load_tokenizer = tokenizer_loader
        self.tokenizer = None
        self.requests: dict[str, _Request] = {}
        self.api = transport.outbox("api")
        self.scheduler = transport.outbox("scheduler")

    async def start(self) -> None:
        self.tokenizer = await asyncio.to_thread(self.load_tokenizer)

    def open_requests(self) -> int:
        return len(self.requests)

    async def handle(self, msg: msgspec.Struct) -> None:
        match msg:
            case StepTokens(started=started, outputs=outputs):
                for params in started:
                    self.requests[params.request_id] = _Request(params)
                deltas = [d for out in outputs if (d := self.detokenize(out)) is not None]
                if deltas:
                    self.api.send(TextDeltas(deltas=deltas))

    def sample_of(self, out: SeqOutput) -> _Sample | None:
        req = self.requests.get(out.request_id)
        if req is None:
            return None
        sample = req.samples.get(out.index)
        if sample is None:
            p = req.params
            decoder = None
            if self.tokenizer is not None:
                decoder = IncrementalDetokenizer(
                    self.tokenizer,
                    skip_special_tokens=p.skip_special_tokens,
                    stop=p.stop,
                    include_stop_str_in_output=p.include_stop_str_in_output,
                    prompt_token_ids=p.prompt_tail,
                )
            sample = req.samples[out.index] = _Sample(p, decoder)
        return sample

    def detokenize(self, out: SeqOutput) -> TextDelta | None:
        sample = self.sample_of(out)
        if sample is None or sample.done:
            return None  # NOTE: already finished by a stop string; the scheduler caught up
        decoder = sample.decoder
        text, stopped_on = decoder.add(out.token_ids) if decoder is not None else ("", None)
        sample.num_output_tokens += len(out.token_ids)
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        if stopped_on is not None:
            finish_reason, stop_reason = "stop", stopped_on
            self.scheduler.send(Abort(request_id=out.request_id, index=out.index, reason="stop"))
        if finish_reason is not None:
            if stopped_on is None and decoder is not None:
                text += decoder.finish()
            self.finish_sample(out.request_id, out.index)
        p = sample.params
        return TextDelta(
            request_id=out.request_id,
            index=out.index,
            text=text,
            token_ids=out.token_ids,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            logprobs=self.logprobs(out),
            num_prompt_tokens=p.num_prompt_tokens,
            num_cached_tokens=p.num_cached_tokens,
            num_output_tokens=sample.num_output_tokens,
            gpu_seconds=out.gpu_seconds,
            queue_seconds=p.queue_seconds,
        )

    def finish_sample(self, request_id: str, index: int) -> None:
        req = self.requests[request_id]
        req.samples[index].done = True
        if sum(s.done for s in req.samples.values()) >= req.params.n:
            del self.requests[request_id]

    def logprobs(self, out: SeqOutput) -> list[TokenLogprob] | None:
        if out.logprobs is None:
            return None
        entries = []
        for token_id, logprob, top in out.logprobs:
            texts = self.token_texts([token_id] + [t for t, _ in top])
            top_entries = [(t, s, lp) for (t, lp), s in zip(top, texts[1:], strict=True)]
            entries.append(TokenLogprob(token_id, texts[0], logprob, top_entries))
        return entries

    def token_texts(self, ids: list[int]) -> list[str]:
        """Display strings; without a tokenizer vLLM's `token_id:N` spelling."""
        if self.tokenizer is None:
            return [f"token_id:{i}" for i in ids]
        return token_texts(self.tokenizer, ids)
