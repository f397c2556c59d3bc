"""The tokenizer actor: prompt text -> token ids, off the HTTP process's event loop.

NOTE: encoding runs in one worker thread, one request at a time (arrival order kept), so a
long prompt never stalls this actor's loop and its heartbeats.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import msgspec

from actors.actor import Actor
from actors.prompt_encoding import BadLiteralSpans, PromptEncoder
from actors.protocol import GenerateRequest, RequestError, TokenizedRequest
from actors.transport import Transport


class TokenizerActor(Actor):
    name = "tokenizer"

    def __init__(self, transport: Transport, tokenizer_loader) -> None:
        super().__init__(transport)
        self.load_tokenizer = tokenizer_loader
        self.tokenizer = None
        self.encoder_of_prompts: PromptEncoder | None = None
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.scheduler = transport.outbox("scheduler")
        self.api = transport.outbox("api")

    async def start(self) -> None:
        self.tokenizer = await asyncio.to_thread(self.load_tokenizer)
        self.encoder_of_prompts = PromptEncoder(self.tokenizer)

    async def handle(self, msg: msgspec.Struct) -> None:
        match msg:
            case GenerateRequest():
                await self.tokenize(msg)

    def encode(self, req: GenerateRequest) -> list[int]:
        return self.encoder_of_prompts.encode(
            req.prompt or "",
            add_special_tokens=req.add_special_tokens,
            literal_spans=req.literal_spans,
        )

    async def tokenize(self, req: GenerateRequest) -> None:
        ids = req.prompt_token_ids
        if ids is None:
            loop = asyncio.get_running_loop()
            try:
                ids = await loop.run_in_executor(self.encoder, self.encode, req)
            except BadLiteralSpans as e:
                self.api.send(RequestError(request_id=req.request_id, status=400,
                                           message=str(e), param="prompt"))  # fmt: skip
                return
        if not ids:
            self.api.send(
                RequestError(
                    request_id=req.request_id,
                    status=400,
                    message="The prompt is empty after tokenization.",
                    param="prompt",
                    code="empty_prompt",
                )
            )
            return
        self.scheduler.send(
            TokenizedRequest(
                request_id=req.request_id,
                prompt_token_ids=list(ids),
                sampling=req.sampling,
                cache_salt=req.cache_salt,
                arrival_time=req.arrival_time,
                feature=req.feature,
            )
        )
