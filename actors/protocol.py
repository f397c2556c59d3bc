"""The wire protocol: every message an actor sends, as msgspec tagged unions.

One union per inbox (socket direction), one typed decoder per inbox; decoding is strict, so
an unknown tag or a wrong type is rejected (and counted) without harming the actor.
No pickle anywhere. Token ids travel as `list[int]`; tensors never go on the wire.
Structs marked `array_like=True` are per-step hot messages: append fields, never reorder.
"""

from __future__ import annotations

from typing import Union

import msgspec

from model_runner.grammar_cache import GrammarCacheStats
from model_runner.sampling_params import GrammarSpec, SamplingParams
from model_runner.step_input import StepInput, StepOutput


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag=True, tag_field="msg"):
    """Base of every message on the wire: tagged with its class name."""


# --- api -> tokenizer -------------------------------------------------------------------


class GenerateRequest(_Message, kw_only=True):
    """A request as the API accepted it: a prompt text or token ids, never both."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    add_special_tokens: bool = True
    sampling: SamplingParams
    cache_salt: str | None = None
    arrival_time: float
    feature: str = "none"  # cost-attribution label, already checked and bounded by the API
    # Character spans of `prompt` that client text wrote as control-token spellings: the
    # tokenizer encodes them as plain text (sorted, non-overlapping).
    literal_spans: list[tuple[int, int]] | None = None
    lora_name: str | None = None  # the adapter the request's `model` names; None: the base


# --- tokenizer -> scheduler, api -> scheduler, detokenizer -> scheduler -----------------


class TokenizedRequest(_Message, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    cache_salt: str | None = None
    arrival_time: float
    feature: str = "none"
    lora_name: str | None = None


class Abort(_Message, kw_only=True):
    """Stop a request (index None: every sample) and free its blocks within a step."""

    request_id: str
    index: int | None = None
    reason: str = "abort"  # "abort" (client gone, timeout) or "stop" (stop string hit)


class ResetPrefixCache(_Message, kw_only=True):
    """Drop every cached block that no live request holds."""


class Drain(_Message, kw_only=True):
    """Shutting down: refuse new requests (503) and abort every request not yet started;
    running ones go on."""


class LoadLoraAdapter(_Message, kw_only=True):
    """Runtime load (`POST /v1/load_lora_adapter`): answered by a LoraAdapterUpdated."""

    request_id: str
    lora_name: str
    lora_path: str


class UnloadLoraAdapter(_Message, kw_only=True):
    """New requests for the adapter get a 404; running ones finish. A LoraAdapterUpdated
    answers."""

    request_id: str
    lora_name: str


# --- executor <-> scheduler -------------------------------------------------------------


class ExecutorReady(_Message, kw_only=True):
    """The model is loaded and the KV cache allocated: the scheduler may plan steps."""

    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    # The most token rows a step with speculative tokens takes on the runner's fast path
    # (the CPU's fused decode layer); the scheduler proposes within it. 0: no limit.
    max_verify_tokens: int = 0


class ExecutorFailed(_Message, kw_only=True):
    """The engine cannot start with these settings (a user error: too long --max-model-len,
    too small a KV cache, an unsupported model...); `message` names what to change."""

    message: str


class StepPlan(_Message, kw_only=True):
    step: StepInput


class StepResult(_Message, kw_only=True):
    output: StepOutput


class StepFailed(_Message, kw_only=True):
    """The step raised; the scheduler fails the requests it held instead of the actor dying."""

    step_id: int
    message: str


class CompileGrammar(_Message, kw_only=True):
    """Compile (or find cached) a request's grammar, off the step loop; the answer is a
    GrammarReady or a GrammarFailed. The request waits for it without a slot."""

    request_id: str
    grammar: GrammarSpec


class ReleaseGrammars(_Message, kw_only=True):
    """These requests will start no more sequences: unpin their grammars (or stop waiting for
    their compiles)."""

    request_ids: list[str]


class ReadLoraAdapter(_Message, kw_only=True):
    """Read and check an adapter into the runner's host cache; a LoraAdapterRead answers."""

    request_id: str
    key: str  # model_runner.step_input.lora_key
    path: str


class LoraAdapterRead(_Message, kw_only=True):
    request_id: str
    error: str | None = None  # why the adapter cannot be served; None: it can


class GrammarReady(_Message, kw_only=True):
    """The request's grammar is compiled and pinned until its ReleaseGrammars."""

    request_id: str
    cached: bool
    stats: GrammarCacheStats


class GrammarFailed(_Message, kw_only=True):
    """The grammar did not compile (a bad spec: 400, or past the timeout); nothing is pinned."""

    request_id: str
    status: int
    message: str
    code: str
    stats: GrammarCacheStats


# --- scheduler -> detokenizer -----------------------------------------------------------


class DetokParams(msgspec.Struct, frozen=True, kw_only=True):
    """What the detokenizer needs of a request, sent with its first output tokens."""

    request_id: str
    n: int
    stop: list[str]
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    prompt_tail: list[int]  # the prompt's last ids: context for the first output token's text
    queue_seconds: float = 0.0  # arrival to first scheduled


class SeqOutput(msgspec.Struct, frozen=True, array_like=True):
    """New tokens of one sample in one step; `finish_reason` set on its last entry."""

    request_id: str
    index: int
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | None = None  # the stop token id that ended it, if any
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    gpu_seconds: float = 0.0  # the request's device time so far (all its samples)


class StepTokens(_Message, kw_only=True):
    """One message per step for all requests."""

    started: list[DetokParams] = []
    outputs: list[SeqOutput] = []


# --- to the api -------------------------------------------------------------------------


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


class TextDelta(msgspec.Struct, frozen=True, array_like=True):
    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0  # total so far for this sample
    gpu_seconds: float = 0.0  # the engine request's device time so far (all its samples)
    queue_seconds: float = 0.0  # arrival to first scheduled


class TextDeltas(_Message, kw_only=True):
    deltas: list[TextDelta]


class RequestError(_Message, kw_only=True):
    """A request refused before it produced anything, in OpenAI's error shape."""

    request_id: str
    status: int
    message: str
    type: str = "BadRequestError"
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None


class SchedulerStats(_Message, kw_only=True):
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # live blocks / all blocks; cached-but-free blocks count as free
    num_blocks_in_use: int
    prefix_cache_queries: int  # tokens, cumulative
    prefix_cache_hits: int  # tokens, cumulative
    num_preemptions: int
    grammar: GrammarCacheStats | None = None  # the executor's, as of its last compile answer
    gpu_seconds_by_feature: dict[str, float] = {}  # cumulative device time per feature label
    prompt_tokens_computed: int = 0  # cumulative prefill tokens (recomputes included)
    generation_tokens: int = 0  # cumulative sampled tokens
    iteration_tokens: list[int] = []  # tokens of each step finished since the last stats
    spec: SpecDecodeStats | None = None  # with --speculative-config, cumulative


class SpecDecodeStats(msgspec.Struct, frozen=True, kw_only=True):
    """Speculative decoding's counters since start (vLLM's spec_decode metrics)."""

    num_drafts: int = 0  # proposals verified (one per speculating row and step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = []  # proposals whose i-th token was accepted


class EngineReady(_Message, kw_only=True):
    """The engine can take requests: sent once by the scheduler when the executor is ready."""

    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int


class EngineFailed(_Message, kw_only=True):
    """The engine cannot start: the scheduler forwards the executor's ExecutorFailed. The API
    prints `message` as one line and exits 2."""

    message: str


class PrefixCacheReset(_Message, kw_only=True):
    ok: bool


class LoraAdapterUpdated(_Message, kw_only=True):
    """The answer to a Load/UnloadLoraAdapter: status 200, or the error's status and text."""

    request_id: str
    status: int
    message: str


# --- to the supervisor ------------------------------------------------------------------


class Heartbeat(_Message, kw_only=True):
    """An actor's event loop is alive; with the state an operator (and the "nothing lost"
    checks) reads from outside: requests the actor still tracks, inbox messages rejected."""

    actor: str
    pid: int
    time: float
    open_requests: int = 0
    rejected_messages: int = 0


ApiInbox = Union[
    TextDeltas,
    RequestError,
    SchedulerStats,
    EngineReady,
    EngineFailed,
    PrefixCacheReset,
    LoraAdapterUpdated,
]
TokenizerInbox = Union[GenerateRequest]
SchedulerInbox = Union[
    TokenizedRequest,
    Abort,
    ResetPrefixCache,
    Drain,
    ExecutorReady,
    ExecutorFailed,
    StepResult,
    StepFailed,
    GrammarReady,
    GrammarFailed,
    LoadLoraAdapter,
    UnloadLoraAdapter,
    LoraAdapterRead,
]
ExecutorInbox = Union[StepPlan, CompileGrammar, ReleaseGrammars, ReadLoraAdapter]
DetokenizerInbox = Union[StepTokens]
SupervisorInbox = Union[Heartbeat]

INBOX_TYPES = {
    "api": ApiInbox,
    "tokenizer": TokenizerInbox,
    "scheduler": SchedulerInbox,
    "executor": ExecutorInbox,
    "detokenizer": DetokenizerInbox,
    "supervisor": SupervisorInbox,
}


# Tensor parallelism: the executor of rank r > 0 is actor `executor-rank{r}`, in a process
# of its own; its inbox takes the executor's union (it acts on StepPlan only).
RANK_EXECUTOR_PREFIX = "executor-rank"


def rank_executor_name(rank: int) -> str:
    return f"{RANK_EXECUTOR_PREFIX}{rank}"


def inbox_type(name: str):
    """The union that the inbox called `name` decodes."""
    if name.startswith(RANK_EXECUTOR_PREFIX):
        return ExecutorInbox
    return INBOX_TYPES[name]
