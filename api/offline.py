"""Offline inference: `LLM(model).generate(prompts, params)`, no HTTP.

The engine runs in-process (every actor a task on one private event loop, in-process
transport) in a background thread, started once per `LLM` and reused by every call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import msgspec
from tqdm.auto import tqdm

from actors.prompt_encoding import PromptEncoder
from api.chat_template import render_chat
from api.errors import ApiError
from api.openai_protocol import ChatMessage
from api.streaming import Accumulator
from api.validation import Limits, check_prompt_fits, verify_sampling_params
from model_runner.sampling_params import SamplingParams

Prompt = str | dict[str, Any]  # a text, or {"prompt_token_ids": [...]} (vLLM's TokensPrompt)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list | None = None  # list[TokenLogprob] when asked for


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's: an adapter by name and PEFT folder (`lora_int_id` is accepted, unused)."""

    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    finished: bool = True


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, engine) -> None:
    if loop.is_closed():
        return
    if engine is not None and loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(engine.shutdown(), loop).result(60)
        except Exception:
            pass
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    if not thread.is_alive():
        loop.close()


class LLM:
    """An engine for offline batches: `LLM(dtype="float32").generate(["Hi"], params)`.

    `engine_kwargs` are `model_runner.config.EngineConfig` fields (max_model_len, dtype, ...).
    """

    def __init__(self, model: str | None = None, *, use_tqdm: bool = True, **engine_kwargs) -> None:
        from model_runner.config import EngineConfig
        from model_runner.spec_config import parse_speculative_config

        spec = engine_kwargs.get("speculative_config")
        if isinstance(spec, dict | str):  # NOTE: vLLM's form: a dict (or its JSON)
            engine_kwargs["speculative_config"] = parse_speculative_config(spec)
        self.config = EngineConfig(model=model, **engine_kwargs)
        self.use_tqdm = use_tqdm
        self._loop = _new_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tokenmill-llm", daemon=True
        )
        self._thread.start()
        self.engine = None
        try:
            self.engine = self._call(self._start_engine())
        except BaseException:
            _stop(self._loop, self._thread, None)
            raise
        self._finalizer = weakref.finalize(self, _stop, self._loop, self._thread, self.engine)
        self.limits = Limits(
            vocab_size=self.engine.vocab_size,
            max_model_len=self.engine.max_model_len,
            max_logprobs=self.config.max_logprobs,
        )

    def _make_engine(self):
        from api.engine_client import EngineClient

        # NOTE: tensor-parallel ranks are processes: the engine's actors then run in worker
        # processes too, as under `serve` (the in-process transport has no sockets for them).
        return EngineClient(self.config, in_process=self.config.tensor_parallel_size == 1)

    async def _start_engine(self):
        engine = self._make_engine()
        await engine.start()
        return engine

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @cached_property
    def prompt_encoder(self) -> PromptEncoder:
        return PromptEncoder(self.engine.tokenizer)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def stats(self):
        """The scheduler's latest SchedulerStats (blocks in use, preemptions, prefix cache)."""
        return self.engine.stats

    def shutdown(self) -> None:
        """Stop the engine and its loop; idempotent (also runs at garbage collection)."""
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of `prompts`.
        `lora_request`: run them with that adapter, or one (or None) per prompt; an adapter
        is loaded on first use (`LLM(enable_lora=True)`)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        texts: list[str | None] = []
        ids: list[list[int] | None] = []
        for p in prompts:
            texts.append(p if isinstance(p, str) else p.get("prompt"))
            ids.append(None if isinstance(p, str) else list(p["prompt_token_ids"]))
        missing = [i for i, x in enumerate(ids) if x is None]
        if missing:
            encoded = self.engine.tokenizer([texts[i] for i in missing]).input_ids
            for i, enc in zip(missing, encoded, strict=True):
                ids[i] = list(enc)
        return self._run(texts, ids, sampling_params, use_tqdm, lora_request)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Chat completions: one conversation (a list of messages) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts, ids = [], []
        for conv in conversations:
            try:
                msgs = msgspec.convert(conv, list[ChatMessage])
                rendered = render_chat(
                    self.engine.tokenizer,
                    msgs,
                    add_generation_prompt=add_generation_prompt,
                    chat_template_kwargs=chat_template_kwargs,
                )
            except (ApiError, msgspec.ValidationError) as e:
                raise ValueError(str(e)) from None
            texts.append(rendered.text)
            ids.append(
                self.prompt_encoder.encode(
                    rendered.text, add_special_tokens=False, literal_spans=rendered.literal_spans
                )
            )
        return self._run(texts, ids, sampling_params, use_tqdm, lora_request)

    def _adapter(self, lora: LoRARequest | None) -> str | None:
        """The adapter's name, loaded into the engine first if it is new."""
        if lora is None:
            return None
        if not self.config.enable_lora:
            raise ValueError("a lora_request needs LLM(enable_lora=True)")
        known = self.engine.lora_adapters.get(lora.lora_name)
        if known is None:
            load = self.engine.load_lora_adapter(lora.lora_name, lora.lora_path)
            status, message = asyncio.run_coroutine_threadsafe(load, self._loop).result()
            if status != 200:
                raise ValueError(message)
        elif known != lora.lora_path:
            raise ValueError(f"the adapter {lora.lora_name!r} is loaded from {known!r}")
        return lora.lora_name

    def _run(self, texts, ids, sampling_params, use_tqdm, lora=None) -> list[RequestOutput]:
        params = self._check(ids, sampling_params)
        loras = lora if isinstance(lora, list) else [lora] * len(ids)
        if len(loras) != len(ids):
            raise ValueError("give one lora_request, or one per prompt")
        names = [self._adapter(x) for x in loras]
        futures = [
            asyncio.run_coroutine_threadsafe(self._one(text, tokens, p, name), self._loop)
            for text, tokens, p, name in zip(texts, ids, params, names, strict=True)
        ]
        show = self.use_tqdm if use_tqdm is None else use_tqdm
        try:
            with tqdm(total=len(futures), desc="Processed prompts", disable=not show) as bar:
                for fut in concurrent.futures.as_completed(futures):
                    fut.result()
                    bar.update(1)
        except BaseException:
            for fut in futures:  # cancelling the task closes its stream: the engine aborts it
                fut.cancel()
            raise
        return [fut.result() for fut in futures]

    def _check(self, ids, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(ids)
        if len(sampling_params) != len(ids):
            raise ValueError("give one SamplingParams, or one per prompt")
        try:
            for tokens, p in zip(ids, sampling_params, strict=True):
                verify_sampling_params(p, self.limits)
                if not tokens:
                    raise ValueError("a prompt must have at least one token")
                check_prompt_fits(len(tokens), p.max_tokens, self.limits)
        except ApiError as e:
            raise ValueError(e.message) from None
        return sampling_params

    async def _one(
        self, text: str | None, ids: list[int], params: SamplingParams, lora: str | None
    ) -> RequestOutput:
        request_id = f"offline-{uuid.uuid4().hex}"
        acc = Accumulator(1, params.n)
        stream = self.engine.generate(
            request_id, prompt_token_ids=ids, sampling=params, lora_name=lora
        )
        try:
            async for delta in stream:
                acc.add(0, delta)
        except ApiError as e:
            raise (ValueError if e.status < 500 else RuntimeError)(e.message) from None
        finally:
            await stream.aclose()
        outputs = [
            CompletionOutput(
                c.index,
                c.text,
                c.token_ids,
                c.finish_reason,
                c.stop_reason,
                c.logprobs if params.logprobs is not None else None,
            )
            for c in acc.choices
        ]
        return RequestOutput(request_id, text, ids, outputs, acc.cached_tokens[0])
