"""Request and sequence state as the scheduler tracks it (token ids, progress, status)."""

from __future__ import annotations

import enum

from actors.protocol import TokenizedRequest
from actors.scheduler.prefix_hash import extend_block_keys
from model_runner.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # in the waiting queue, holds no blocks
    RUNNING = "running"  # holds blocks; computed a bit more each step it is scheduled
    FORK_PENDING = "fork_pending"  # a sample of n > 1 waiting for sample 0's prompt
    FINISHED = "finished"


def sample_seq_ids(request_id: str, n: int) -> list[str]:
    """The sequence ids of a request's n samples."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


class Request:
    """One TokenizedRequest: its n samples share the prompt (and its KV blocks)."""

    __slots__ = (
        "request_id",
        "sampling",
        "prompt_token_ids",
        "max_tokens",
        "extra_key",
        "stop_token_ids",
        "seqs",
        "num_live",
        "started",
        "num_cached_tokens",
        "counted",
        "feature",
        "arrival_time",
        "queue_seconds",
        "gpu_seconds",
        "lora",
        "lora_slot",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        extra_key: bytes,
        feature: str = "none",
        arrival_time: float = 0.0,
    ) -> None:
        self.request_id = request_id
        self.sampling = sampling
        self.prompt_token_ids = prompt_token_ids
        self.max_tokens = max_tokens  # effective: never None
        self.extra_key = extra_key  # prefix-cache extra keys (cache_salt, LoRA name)
        self.stop_token_ids = frozenset(sampling.stop_token_ids)
        self.seqs: list[Sequence] = []
        self.num_live = 0
        self.started = False  # DetokParams sent
        self.num_cached_tokens = 0  # prefix-cache hit tokens of the first admission
        self.counted = False  # prefix-cache query counted in the stats
        self.feature = feature  # cost-attribution label
        self.arrival_time = arrival_time  # wall clock, when the API accepted it
        self.queue_seconds: float | None = None  # arrival to first scheduled, once scheduled
        self.gpu_seconds = 0.0  # device time charged so far (actors/scheduler/cost.py)
        self.lora: tuple[str, str] | None = None  # its adapter's (key, path); None: the base
        self.lora_slot = -1  # the adapter's slot while a sample runs (lora_slots.py)

    @classmethod
    def with_samples(cls, req: TokenizedRequest, max_tokens: int, extra_key: bytes) -> Request:
        """The request and its n samples: sample 0 waits, the others fork from it later."""
        request = cls(
            req.request_id, list(req.prompt_token_ids), req.sampling, max_tokens, extra_key,
            feature=req.feature, arrival_time=req.arrival_time,
        )  # fmt: skip
        n = max(1, req.sampling.n)
        for i, seq_id in enumerate(sample_seq_ids(req.request_id, n)):
            request.seqs.append(Sequence(seq_id, request, i, SeqStatus.WAITING if i == 0
                                         else SeqStatus.FORK_PENDING))  # fmt: skip
        leader = request.seqs[0]
        leader.forks = request.seqs[1:]
        for child in leader.forks:
            child.fork_parent = leader
        request.num_live = n
        return request


class Sequence:
    """One sample of a request: its token ids and how far their K/V are computed."""

    __slots__ = (
        "seq_id",
        "request",
        "index",
        "token_ids",
        "prompt_len",
        "seed",
        "status",
        "num_computed",
        "num_scheduled",
        "num_pending",
        "block_keys",
        "forks",
        "fork_parent",
        "on_runner",
        "in_flight",
        "num_drafts",
    )

    def __init__(self, seq_id: str, request: Request, index: int, status: SeqStatus) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.token_ids = list(request.prompt_token_ids)
        self.prompt_len = len(self.token_ids)
        seed = request.sampling.seed
        self.seed = None if seed is None else seed + index
        self.status = status
        self.num_computed = 0  # leading tokens whose K/V the finished steps computed
        # NOTE: overlap. num_scheduled >= num_computed counts the tokens of the steps in flight
        # too; num_pending is how many tokens those steps will sample (unknown to the host
        # yet): the sequence's length as planned is num_tokens + num_pending.
        self.num_scheduled = 0
        self.num_pending = 0
        self.block_keys: list[bytes] = []  # prefix-cache keys of its full blocks, as known
        self.forks: list[Sequence] = []  # samples that fork from this one after its prompt
        self.fork_parent: Sequence | None = None
        self.on_runner = False  # the runner holds its state (sent as NewSequence)
        self.in_flight = 0  # how many of the steps in flight (at most two) compute it
        self.num_drafts = 0  # speculative tokens the step in flight verifies for it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_planned_tokens(self) -> int:
        """Its length once the steps in flight have sampled (placeholders included)."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def full_block_keys(self, block_size: int, num_full: int) -> list[bytes]:
        """Prefix-cache keys of its first `num_full` full blocks (computed once, kept)."""
        return extend_block_keys(
            self.block_keys, self.token_ids, block_size, self.request.extra_key, num_full
        )

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed})"
        )
