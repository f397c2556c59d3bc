"""The tokenizer actor: prompt text -> token ids, off the HTTP process's event loop.

NOTE: encoding runs in one worker thread, one request at a time (arrival order kept), so a
long prompt never stalls this actor's loop and its heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import msgspec

from actors.actor import Actor
from actors.prompt_encoding import BadLiteralSpans, PromptEncoder
from actors.protocol import GenerateRequest, RequestError, TokenizedRequest
from actors.transport import Transport

log = logging.getLogger(__name__)


class TokenizerActor(Actor):
    name = "tokenizer"

    def __init__(self, transport: Transport, tokenizer_loader) -> None:
        super().__init__(transport)
        self.load_tokenizer = tokenizer_loader
        self.tokenizer = None
        self.encoder_of_prompts: PromptEncoder | None = None
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.encoding = 0  # requests handed to the encoder thread, not yet sent on
        self.scheduler = transport.outbox("scheduler")
        self.api = transport.outbox("api")

    async def start(self) -> None:
        self.tokenizer = await asyncio.to_thread(self.load_tokenizer)
        if self.tokenizer is not None:  # NOTE: None: --skip-tokenizer-init, ids pass through
            self.encoder_of_prompts = PromptEncoder(self.tokenizer)

    def open_requests(self) -> int:
        return self.encoding

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
        if ids is None and self.encoder_of_prompts is None:
            self.refuse(req, "A text prompt needs a tokenizer (--skip-tokenizer-init).",
                        "tokenizer_skipped")  # fmt: skip
            return
        if ids is None:
            self.encoding += 1
            try:
                loop = asyncio.get_running_loop()
                ids = await loop.run_in_executor(self.encoder, self.encode, req)
            except BadLiteralSpans as e:
                self.refuse(req, str(e), "invalid_prompt")
                return
            except Exception:  # NOTE: a request is always answered, never left hanging
                log.exception("tokenizing request %s failed", req.request_id)
                self.refuse(req, "The prompt could not be tokenized.", "invalid_prompt")
                return
            finally:
                self.encoding -= 1
        if not ids:
            self.refuse(req, "The prompt is empty after tokenization.", "empty_prompt")
            return
        self.scheduler.send(
            TokenizedRequest(
                request_id=req.request_id,
                prompt_token_ids=list(ids),
                sampling=req.sampling,
                cache_salt=req.cache_salt,
                arrival_time=req.arrival_time,
                feature=req.feature,
                lora_name=req.lora_name,
            )
        )

    def refuse(self, req: GenerateRequest, message: str, code: str) -> None:
        self.api.send(
            RequestError(
                request_id=req.request_id, status=400, message=message, param="prompt", code=code
            )
        )
