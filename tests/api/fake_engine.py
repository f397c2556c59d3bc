"""A stand-in for `api.engine_client.EngineClient`: same interface, canned output.

Every sample streams the tokens of `FakeEngine.OUTPUT` (one token per delta, samples
interleaved), truncated to `max_tokens`; the engine's refusals are simulated the way the
real engine raises them (an `EngineRequestError` before the first delta).
"""

from __future__ import annotations

import asyncio

from actors.prompt_encoding import PromptEncoder
from actors.protocol import SchedulerStats, TextDelta, TokenLogprob
from api.engine_client import ActorState
from api.errors import EngineRequestError
from model_runner.sampling_params import SamplingParams

EMPTY_STATS = SchedulerStats(
    num_running=0,
    num_waiting=0,
    kv_cache_usage=0.0,
    num_blocks_in_use=0,
    prefix_cache_queries=0,
    prefix_cache_hits=0,
    num_preemptions=0,
)


class FakeEngine:
    OUTPUT = " The quick brown fox jumps over the lazy dog."

    def __init__(
        self,
        tokenizer,
        *,
        model_name: str = "fake-model",
        max_model_len: int = 512,
        delay: float = 0.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_encoder = PromptEncoder(tokenizer)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = len(tokenizer)
        self.delay = delay
        self.output_ids = tokenizer.encode(self.OUTPUT, add_special_tokens=False)
        self.calls: list[dict] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.refusal: EngineRequestError | None = None
        self.fail_at: int | None = None  # step at which sample 0 ends with "error"
        self.cached_tokens = 0
        self.healthy: tuple[bool, str] = (True, "ok")
        self.stats: SchedulerStats | None = EMPTY_STATS
        self.resets = 0
        self.draining = False
        self.stats_listeners: list = []
        self.lora_adapters: dict[str, str] = {}  # served adapter names -> paths

    def set_output(self, text: str) -> None:
        """What every sample streams from now on (one token per delta)."""
        self.output_ids = self.tokenizer.encode(text, add_special_tokens=False)

    def health(self) -> tuple[bool, str]:
        return self.healthy

    def actor_states(self) -> dict[str, ActorState]:
        return {"api": ActorState(open_requests=0, rejected_messages=0)}

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def prompt_ids(self, prompt, prompt_token_ids, add_special_tokens, literal_spans=None):
        if prompt is None:
            return list(prompt_token_ids)
        return self.prompt_encoder.encode(
            prompt, add_special_tokens=add_special_tokens, literal_spans=literal_spans
        )

    async def generate(
        self,
        request_id: str,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        sampling: SamplingParams,
        add_special_tokens: bool = True,
        cache_salt: str | None = None,
        feature: str = "none",
        literal_spans: list[tuple[int, int]] | None = None,
        lora_name: str | None = None,
    ):
        self.calls.append(
            dict(
                request_id=request_id,
                feature=feature,
                prompt=prompt,
                sampling=sampling,
                prompt_token_ids=prompt_token_ids,
                cache_salt=cache_salt,
                add_special_tokens=add_special_tokens,
                literal_spans=literal_spans,
                lora_name=lora_name,
            )
        )
        if self.refusal is not None:
            raise self.refusal
        ids = self.prompt_ids(prompt, prompt_token_ids, add_special_tokens, literal_spans)
        limit = sampling.max_tokens or self.max_model_len - len(ids)
        if len(ids) + limit > self.max_model_len:
            raise EngineRequestError(
                400,
                f"prompt of {len(ids)} tokens plus max_tokens {limit} "
                f"exceeds max_model_len {self.max_model_len}",
                param="max_tokens",
            )
        tokens = self.output_ids[:limit]
        final = "length" if limit < len(self.output_ids) else "stop"
        unfinished = sampling.n
        try:
            for step, tok in enumerate(tokens):
                for index in range(sampling.n):
                    await asyncio.sleep(self.delay)
                    last = step == len(tokens) - 1
                    finish = final if last else None
                    if self.fail_at == step and index == 0:
                        finish, last = "error", True
                    yield self.delta(request_id, index, tok, step, len(ids), sampling, finish)
                    unfinished -= 1 if last else 0
                if self.fail_at == step:
                    break
        finally:
            (self.aborted if unfinished else self.finished).append(request_id)

    def delta(self, request_id, index, tok, step, num_prompt, sampling, finish) -> TextDelta:
        logprobs = None
        if sampling.logprobs is not None:
            top = [
                (t, self.tokenizer.decode([t]), -0.5 - k)
                for k, t in enumerate([tok, 0, 1][: sampling.logprobs])
            ]
            logprobs = [TokenLogprob(tok, self.tokenizer.decode([tok]), -0.5, top)]
        return TextDelta(
            request_id=request_id,
            index=index,
            text=self.tokenizer.decode([tok]),
            token_ids=[tok],
            finish_reason=finish,
            logprobs=logprobs,
            num_prompt_tokens=num_prompt,
            num_cached_tokens=self.cached_tokens,
            num_output_tokens=step + 1,
        )
