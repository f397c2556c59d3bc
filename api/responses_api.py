"""OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

A Responses request is served as a chat request (`api.responses_input`) through the chat
path's checks, template, tool parsers and grammars (`OpenAIServing.start_chat`); its output
is read back into Responses items (`api.responses_output`). With `store` (default true) the
response and its conversation are kept (`api.responses_store`), per API key, so that
`previous_response_id` continues it.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from quart import Quart, Response, request

from api.errors import ApiError
from api.responses_input import chat_request, input_items, responses_param
from api.responses_output import OutputBuilder, new_id, output_text, status_of, usage
from api.responses_protocol import ResponsesRequest, check_fields
from api.responses_store import ResponseStore, owner_of
from api.responses_stream import ResponsesStreamer, named_sse
from api.serving import OpenAIServing, json_response
from api.streaming import Accumulator
from api.token_only import needs_tokenizer
from api.validation import check_model, decode_body


class ResponsesServing:
    """The Responses endpoints over the chat path of `chat` and one store."""

    def __init__(self, chat: OpenAIServing, store: ResponseStore) -> None:
        self.chat = chat
        self.store = store

    async def create(self, body: bytes, owner: str, feature_header: str | None) -> Response:
        req = decode_body(body, ResponsesRequest)
        check_fields(msgspec.json.decode(body))
        engine = self.chat.engine
        lora = check_model(req.model, engine.model_name, engine.lora_adapters)
        if self.chat.token_only:
            raise needs_tokenizer("A Responses request", "input")
        history = self._history(owner, req.previous_response_id)
        items = history + input_items(req)
        feature = self.chat.features.label(feature_header, req.metadata)
        response_id = new_id("resp")
        try:
            chat_req = chat_request(req, items, len(history))
            it, _, plan = await self.chat.start_chat(chat_req, response_id, feature, lora)
        except ApiError as e:
            raise responses_param(e) from None
        model = lora or engine.model_name
        base = _base_body(req, response_id, model)
        tracker = self.chat.metrics.track(response_id, feature, 1, self.chat.log_request, model)
        acc, builder = Accumulator(1, 1), OutputBuilder(plan)

        def finished(builder: OutputBuilder, acc: Accumulator) -> dict[str, Any]:
            body = _final_body(base, builder, acc)
            if base["store"] and body["status"] != "failed":
                self.store.put(owner, body, items + builder.items)
            return body

        try:
            if req.stream:
                streamer = ResponsesStreamer(_in_progress(base), acc, builder, finished)
                return await self.chat.stream([it], streamer, tracker, named_sse, b"")
            await self.chat.collect([it], acc, tracker)
        except ApiError as e:
            raise responses_param(e) from None
        builder.feed(acc.choices[0].text)
        builder.finish(acc.choices[0].finish_reason != "length")
        return json_response(finished(builder, acc))

    def _history(self, owner: str, previous_id: str | None) -> list[dict[str, Any]]:
        if previous_id is None:
            return []
        return self._stored(owner, previous_id, "previous_response_id").items

    def _stored(self, owner: str, response_id: str, param: str | None = None):
        record = self.store.get(owner, response_id)
        if record is None:
            raise ApiError(404, f"No response with id `{response_id}` is stored.", param=param)
        return record

    def retrieve(self, owner: str, response_id: str) -> Response:
        return json_response(self._stored(owner, response_id).body)

    def delete(self, owner: str, response_id: str) -> Response:
        if not self.store.delete(owner, response_id):
            raise ApiError(404, f"No response with id `{response_id}` is stored.")
        return json_response({"id": response_id, "object": "response", "deleted": True})


def _base_body(req: ResponsesRequest, response_id: str, model: str) -> dict[str, Any]:
    """The fields every body of this response shares (the request's settings echoed)."""
    fmt = (req.text or {}).get("format") or {"type": "text"}
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "store": req.store is not False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "text": {"format": fmt},
        "tool_choice": req.tool_choice or "auto",
        "tools": req.tools or [],
        "truncation": "disabled",
        "background": False,
        "user": req.user,
    }


def _in_progress(base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "status": "in_progress", "error": None, "incomplete_details": None,
            "output": [], "output_text": "", "usage": None}  # fmt: skip


def _final_body(base: dict[str, Any], builder: OutputBuilder, acc: Accumulator) -> dict[str, Any]:
    status, incomplete, error = status_of(acc.choices[0].finish_reason)
    return {**base, "status": status, "error": error, "incomplete_details": incomplete,
            "output": builder.items, "output_text": output_text(builder.items),
            "usage": usage(acc)}  # fmt: skip


def register_responses_routes(app: Quart, serving: ResponsesServing) -> None:
    def owner() -> str:
        return owner_of(request.headers.get("Authorization"))

    @app.post("/v1/responses")
    async def create_response():
        body = await request.get_data()
        return await serving.create(body, owner(), request.headers.get("X-Feature"))

    @app.get("/v1/responses/<response_id>")
    async def retrieve_response(response_id: str):
        return serving.retrieve(owner(), response_id)

    @app.delete("/v1/responses/<response_id>")
    async def delete_response(response_id: str):
        return serving.delete(owner(), response_id)
