"""The OpenAI endpoints' logic: request body in, JSON or an SSE stream out.

Order of work per request: decode (400 on a type error) -> model name (404) -> ranges and
prompt checks (400) -> chat template -> engine. Nothing reaches the engine before every
check passed. A streamed response waits for the engine's first delta before its headers go
out, so a refusal by the engine still answers with its own 4xx/503 status.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial

import msgspec
from quart import Response
from quart.wrappers.response import ResponseBody

from actors.prompt_encoding import PromptEncoder
from api.chat_template import ChatTemplates, render_chat, uses_tools
from api.errors import ApiError, bad_request, error_body
from api.features import FeatureTags
from api.metrics import ServingMetrics
from api.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
)
from api.request_tracker import RequestTracker
from api.responses import ChatStreamer, CompletionStreamer, chat_response, completion_response
from api.streaming import Accumulator, DeltaStream
from api.structured_outputs import checked_constraint, off_the_loop
from api.token_only import check_token_only_completion, needs_tokenizer
from api.tools import ToolPlan, chat_constraints
from api.validation import (
    Limits,
    chat_sampling_params,
    check_model,
    check_token_ids,
    completion_prompts,
    completion_sampling_params,
    decode_body,
)
from model_runner.sampling_params import SamplingParams

log = logging.getLogger(__name__)
_request_log = logging.getLogger("tokenmill.requests")

_encode = msgspec.json.Encoder().encode
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
INLINE_TOKENIZE_CHARS = 20_000  # longer texts are tokenized off the event loop


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_encode(body), status, headers, content_type="application/json")


def log_request(record: dict) -> None:
    """One finished request as a JSON line (`--enable-log-requests`)."""
    _request_log.info("%s", _encode(record).decode())


def sse(chunk: dict) -> bytes:
    return b"data: " + _encode(chunk) + b"\n\n"


class SSEBody(ResponseBody):
    """The SSE body; closing it (even unstarted) closes the engine streams, aborting them."""

    def __init__(self, events: AsyncIterator[bytes], stream: DeltaStream) -> None:
        self.events = events
        self.stream = stream

    async def __aenter__(self) -> SSEBody:
        return self

    async def __aexit__(self, *exc_info) -> None:
        try:
            await self.events.aclose()
        finally:
            await self.stream.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.events


DONE = b"data: [DONE]\n\n"


async def sse_events(
    stream: DeltaStream, streamer, tracker: RequestTracker, frame=sse, sentinel: bytes = DONE
) -> AsyncIterator[bytes]:
    """Chunks, then the usage chunk if asked, then `sentinel`; an error becomes the events of
    `streamer.failed(body)` (an error chunk on the chat path). `frame` writes one SSE event."""
    try:
        for chunk in streamer.start():
            yield frame(chunk)
        async for src, delta in stream.events():
            for chunk in streamer.on_delta(src, delta):
                yield frame(chunk)
        for chunk in streamer.finish():
            yield frame(chunk)
    except ApiError as e:
        for chunk in streamer.failed(e.body()):
            yield frame(chunk)
    except Exception:
        log.exception("streamed request failed")
        for chunk in streamer.failed(error_body("Internal error while streaming.", 500)):
            yield frame(chunk)
    finally:
        await stream.aclose()
        tracker.finish(streamer.acc)
    if sentinel:
        yield sentinel


def _usage_options(req) -> dict:
    opts = req.stream_options
    return {
        "include_usage": bool(opts and opts.include_usage),
        "continuous_usage": bool(opts and opts.continuous_usage_stats),
    }


class OpenAIServing:
    """Chat, completions, tokenize and detokenize against one engine."""

    def __init__(self, engine, config, metrics: ServingMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.created = int(time.time())
        self._limits: Limits | None = None
        self.templates = ChatTemplates(engine.tokenizer, config.chat_template)
        # NOTE: None under --skip-tokenizer-init (api.token_only): token ids in and out only
        self.token_only = engine.tokenizer is None
        self.prompt_encoder = None if self.token_only else PromptEncoder(engine.tokenizer)
        self.features = FeatureTags(config.max_feature_tags)
        self.log_request = log_request if config.enable_log_requests else None

    @property
    def limits(self) -> Limits:
        if self._limits is None:  # NOTE: the engine knows its numbers only once started
            self._limits = Limits(
                vocab_size=self.engine.vocab_size,
                max_model_len=self.engine.max_model_len,
                max_logprobs=self.config.max_logprobs,
            )
        return self._limits

    def models(self) -> dict:
        name = self.engine.model_name
        card = {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "tokenmill",
            "root": name,
            "parent": None,
            "max_model_len": self.engine.max_model_len,
            "permission": [],
        }
        adapters = [
            card | {"id": lora, "root": path, "parent": name}
            for lora, path in self.engine.lora_adapters.items()
        ]
        return {"object": "list", "data": [card, *adapters]}

    async def chat(self, body: bytes, feature_header: str | None = None) -> Response:
        req = decode_body(body, ChatCompletionRequest)
        lora = check_model(req.model, self.engine.model_name, self.engine.lora_adapters)
        if self.token_only:
            raise needs_tokenizer("A chat request", "messages")
        feature = self.features.label(feature_header, req.metadata)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        it, sampling, tool_plan = await self.start_chat(req, request_id, feature, lora)
        acc = Accumulator(1, sampling.n)
        created, model = int(time.time()), lora or self.engine.model_name
        tracker = self.metrics.track(request_id, feature, sampling.n, self.log_request, model)
        if req.stream:
            streamer = ChatStreamer(
                request_id, created, model, acc, logprobs=req.logprobs, tool_plan=tool_plan,
                **_usage_options(req),
            )  # fmt: skip
            return await self.stream([it], streamer, tracker)
        await self.collect([it], acc, tracker)
        return json_response(
            chat_response(request_id, created, model, acc, req.logprobs, tool_plan)
        )

    async def start_chat(
        self, req: ChatCompletionRequest, request_id: str, feature: str, lora: str | None
    ) -> tuple[AsyncIterator, SamplingParams, ToolPlan]:
        """Checks, grammar, template, then the engine request of a chat (also the Responses
        API's way in: `api.responses_api` turns its requests into chat requests)."""
        tool_plan, constraint = await off_the_loop(chat_constraints, req, self.config.tool_config)
        sampling = chat_sampling_params(
            req, self.limits, constraint and constraint.grammar,
            trust_request_chat_template=self.config.trust_request_chat_template,
        )  # fmt: skip
        render = partial(
            render_chat,
            self.engine.tokenizer,
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            tools=tool_plan.prompt_tools,
            documents=req.documents,
            chat_template_kwargs=req.chat_template_kwargs,
            template=self.templates.pick(uses_tools(req.messages, tool_plan.prompt_tools)),
            request_template=req.chat_template,
            spellings=self.templates.spellings,
        )
        # NOTE: a request's template renders in a thread; its own deadline ends the render
        rendered = await asyncio.to_thread(render) if req.chat_template is not None else render()
        it = self.engine.generate(
            request_id,
            prompt=rendered.text,
            literal_spans=rendered.literal_spans,
            sampling=sampling,
            add_special_tokens=req.add_special_tokens,
            cache_salt=req.cache_salt,
            feature=feature,
            lora_name=lora,
        )
        return it, sampling, tool_plan

    async def completions(self, body: bytes, feature_header: str | None = None) -> Response:
        req = decode_body(body, CompletionRequest)
        lora = check_model(req.model, self.engine.model_name, self.engine.lora_adapters)
        feature = self.features.label(feature_header, req.metadata)
        constraint = await off_the_loop(checked_constraint, req)
        sampling = completion_sampling_params(req, self.limits, constraint and constraint.grammar)
        prompts = completion_prompts(req, self.limits)
        if self.token_only:
            check_token_only_completion(req, prompts, constraint is not None)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        iterators = [
            self.engine.generate(
                request_id if len(prompts) == 1 else f"{request_id}-{i}",
                prompt=p if isinstance(p, str) else None,
                prompt_token_ids=None if isinstance(p, str) else p,
                sampling=sampling,
                add_special_tokens=req.add_special_tokens,
                cache_salt=req.cache_salt,
                feature=feature,
                lora_name=lora,
            )
            for i, p in enumerate(prompts)
        ]
        tracker = self.metrics.track(request_id, feature, sampling.n, self.log_request, lora)
        echo = None
        if req.echo:
            echo = [p if isinstance(p, str) else self.engine.tokenizer.decode(p) for p in prompts]
        acc = Accumulator(len(prompts), sampling.n)
        created, model = int(time.time()), lora or self.engine.model_name
        logprobs = req.logprobs is not None
        if req.stream:
            streamer = CompletionStreamer(
                request_id, created, model, acc, logprobs=logprobs, echo=echo,
                token_ids=self.token_only, **_usage_options(req),
            )  # fmt: skip
            return await self.stream(iterators, streamer, tracker)
        await self.collect(iterators, acc, tracker)
        body = completion_response(
            request_id, created, model, acc, logprobs, echo, token_ids=self.token_only
        )
        return json_response(body)

    async def collect(self, iterators: list, acc: Accumulator, tracker: RequestTracker) -> None:
        """Run the engine requests to the end; a disconnect cancels this and aborts them.
        Cut short by a shutdown, the request is a 503 (streams end "abort" instead)."""
        stream = DeltaStream(iterators, tracker.on_delta)
        await stream.open()
        try:
            async for src, delta in stream.events():
                acc.add(src, delta)
        finally:
            await stream.aclose()
            tracker.finish(acc)
        if self.engine.draining and any(c.finish_reason == "abort" for c in acc.choices):
            raise ApiError(503, "The server shut down before the request finished.",
                           code="shutting_down", retry_after=1.0)  # fmt: skip

    async def stream(
        self, iterators: list, streamer, tracker: RequestTracker, frame=sse, sentinel=DONE
    ) -> Response:
        stream = DeltaStream(iterators, tracker.on_delta)
        await stream.open()  # NOTE: before the headers, so a refusal keeps its status
        events = sse_events(stream, streamer, tracker, frame, sentinel)
        response = Response(
            SSEBody(events, stream), 200, SSE_HEADERS, content_type="text/event-stream"
        )
        response.timeout = None
        return response

    async def tokenize(self, body: bytes) -> Response:
        req = decode_body(body, TokenizeRequest)
        check_model(req.model, self.engine.model_name, self.engine.lora_adapters)
        if self.token_only:
            raise needs_tokenizer("/tokenize", None)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Give exactly one of `prompt` and `messages`.", "prompt")
        tokenizer = self.engine.tokenizer
        spans = None
        if req.messages is not None:
            rendered = render_chat(
                tokenizer,
                req.messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                tools=req.tools,
                chat_template_kwargs=req.chat_template_kwargs,
                template=self.templates.pick(uses_tools(req.messages, req.tools)),
                spellings=self.templates.spellings,
            )
            text, spans = rendered.text, rendered.literal_spans
            special = bool(req.add_special_tokens)
        else:
            text = req.prompt
            special = req.add_special_tokens is not False
        # NOTE: the tokenizer actor's encoding, so the ids are the ones generation uses
        encode = partial(
            self.prompt_encoder.encode, text, add_special_tokens=special, literal_spans=spans
        )
        ids = await asyncio.to_thread(encode) if len(text) > INLINE_TOKENIZE_CHARS else encode()
        strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return json_response(
            {
                "count": len(ids),
                "max_model_len": self.engine.max_model_len,
                "tokens": ids,
                "token_strs": strs,
            }
        )

    async def load_lora_adapter(self, body: bytes) -> Response:
        req = decode_body(body, LoadLoraAdapterRequest)
        if not req.lora_name or req.lora_name == self.engine.model_name:
            raise bad_request("`lora_name` must be a new name, not the base model's.", "lora_name")
        if not req.lora_path:
            raise bad_request("`lora_path` must name a PEFT adapter folder.", "lora_path")
        status, message = await self.engine.load_lora_adapter(req.lora_name, req.lora_path)
        return _lora_answer(status, message, "lora_path" if status == 400 else "lora_name")

    async def unload_lora_adapter(self, body: bytes) -> Response:
        req = decode_body(body, UnloadLoraAdapterRequest)
        status, message = await self.engine.unload_lora_adapter(req.lora_name)
        return _lora_answer(status, message, "lora_name")

    async def detokenize(self, body: bytes) -> Response:
        req = decode_body(body, DetokenizeRequest)
        check_model(req.model, self.engine.model_name, self.engine.lora_adapters)
        if self.token_only:
            raise needs_tokenizer("/detokenize", None)
        ids = check_token_ids(req.tokens, self.limits, "tokens")
        return json_response({"prompt": self.engine.tokenizer.decode(ids)})


def _lora_answer(status: int, message: str, param: str) -> Response:
    """vLLM's answers: the text on success, OpenAI's error shape otherwise."""
    if status == 200:
        return Response(message, 200, content_type="text/plain")
    raise ApiError(status, message, param=param)
