"""Admission checks: refuse at once what can never run, and what the queue cannot hold."""

from __future__ import annotations

from actors.scheduler.errors import AdmissionError

RETRY_AFTER_SECONDS = 1.0


def effective_max_tokens(max_tokens: int | None, prompt_len: int, max_model_len: int) -> int:
    """max_tokens, where None means as many as fit: max_model_len - prompt_len."""
    return max_model_len - prompt_len if max_tokens is None else max_tokens


def check_admission(
    prompt_len: int,
    max_tokens: int | None,
    *,
    max_model_len: int,
    num_blocks: int,
    block_size: int,
    num_waiting: int,
    max_waiting: int,
) -> None:
    """Raise AdmissionError (400 or 503) when a request cannot be queued; vLLM's wording."""
    if prompt_len == 0:
        raise AdmissionError(400, "The prompt is empty.", param="prompt")
    if prompt_len >= max_model_len:
        raise AdmissionError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {prompt_len} input tokens. Please reduce the length of the input "
            "messages.",
            param="prompt",
            code="context_length_exceeded",
        )
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise AdmissionError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
            f"model's maximum context length is {max_model_len} tokens and your request has "
            f"{prompt_len} input tokens ({max_tokens} > {max_model_len} - {prompt_len}).",
            param="max_tokens",
            code="context_length_exceeded",
        )
    needed = -(-prompt_len // block_size)
    if needed > num_blocks:
        raise AdmissionError(
            400,
            f"The prompt has {prompt_len} input tokens, which need {needed} KV-cache blocks, "
            f"but the whole KV cache holds {num_blocks} blocks of {block_size} tokens "
            f"({num_blocks * block_size} tokens). Please reduce the length of the input "
            "messages.",
            param="prompt",
            code="kv_cache_exceeded",
        )
    if num_waiting >= max_waiting:
        raise AdmissionError(
            503,
            f"The server is overloaded: {num_waiting} requests are waiting (max_waiting "
            f"{max_waiting}). Please retry later.",
            code="server_overloaded",
            retry_after=RETRY_AFTER_SECONDS,
        )
