"""Model parallelism: which rank this process is, what slice of each weight it owns, and the
collectives between ranks (torch.distributed: gloo on the CPU, NCCL on CUDA).

Tensor parallelism (Megatron-style, as vLLM): column-parallel q/k/v and gate/up (each rank
computes its heads and its slice of the MLP), row-parallel o/down (partial sums, then one
all-reduce), vocab-parallel embedding (a rank looks up only its rows, an all-reduce adds
them) and LM head (an all-gather joins the vocabulary slices). KV heads are split across
ranks, or replicated when there are more ranks than KV heads.

NOTE: `RankPlacement` is where a later pipeline stage goes (a stage index beside the rank);
every rank of one tensor-parallel group runs the same steps in the same order.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model_runner.config import EngineConfigError

log = logging.getLogger(__name__)

STORE_FILE = "tensor-parallel.store"  # in the engine's private run directory
STARTUP_TIMEOUT_S = 600.0  # as the supervisor's start-up grace: a model load on a busy host


@dataclass(frozen=True)
class RankPlacement:
    """Where one model shard runs: rank `rank` of `world_size` tensor-parallel ranks."""

    rank: int = 0
    world_size: int = 1
    run_dir: str | None = None  # the FileStore's folder (None: a single rank needs none)

    @property
    def is_driver(self) -> bool:
        """Rank 0 samples and answers the scheduler."""
        return self.rank == 0


@dataclass(frozen=True)
class TensorSlice:
    """Elements [start, stop) of dimension `dim` of a full (unsharded) weight."""

    dim: int
    start: int
    stop: int


class TensorParallel:
    """This rank's share of the model and its collectives; one rank means no collective."""

    def __init__(self, placement: RankPlacement = RankPlacement(), store=None, group=None):
        self.rank = placement.rank
        self.world_size = placement.world_size
        self.store = store  # the rendezvous FileStore (None on one rank)
        self.group = group  # the ranks' process group, with the collective timeout

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # --- shards ----------------------------------------------------------------------

    def split(self, size: int) -> tuple[int, int]:
        """This rank's [start, stop) of `size` items split evenly (checked divisible)."""
        per_rank = size // self.world_size
        assert per_rank * self.world_size == size, (size, self.world_size)
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """This rank's [start, stop) KV heads: split, or one replicated head per
        world_size / num_kv_heads ranks when there are more ranks than KV heads."""
        if self.world_size <= num_kv_heads:
            return self.split(num_kv_heads)
        head = self.rank * num_kv_heads // self.world_size
        return head, head + 1

    # --- collectives -----------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in place); every rank gets the same bits."""
        if self.enabled:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., world_size * n], rank 0's slice first."""
        if not self.enabled:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_tokens(self, tokens: torch.Tensor | None, count: int, device) -> torch.Tensor:
        """Rank 0's `count` sampled tokens (a device tensor) on every rank, without a host
        round trip (others pass None)."""
        if self.rank != 0:
            tokens = torch.empty(count, dtype=torch.long, device=device)
        if count:
            dist.broadcast(tokens, src=0, group=self.group)
        return tokens

    def wait_for_all_ranks(self, stage: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Until every rank reached `stage` (loading the weights may take minutes: a count
        in the store, not a collective, whose timeout is for a step)."""
        if not self.enabled:
            return
        key = f"ranks-at-{stage}"
        self.store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while self.store.add(key, 0) < self.world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every tensor-parallel rank reached {stage!r}")
            time.sleep(0.05)

    def min_over_ranks(self, value: int, device) -> int:
        """The smallest `value` of all ranks (the KV cache must have as many blocks on each)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def check_tensor_parallel_shape(model_config, world_size: int) -> None:
    """A model whose heads, KV heads, MLP or vocabulary do not split into `world_size`
    equal shards cannot be served so (EngineConfigError naming the numbers)."""
    if world_size == 1:
        return
    flag = f"--tensor-parallel-size {world_size}"
    mc = model_config
    kv = mc.num_kv_heads
    checks = [
        (mc.num_heads % world_size, f"the model's {mc.num_heads} attention heads"),
        (mc.intermediate_size % world_size, f"its MLP size {mc.intermediate_size}"),
        (mc.vocab_size % world_size, f"its vocabulary of {mc.vocab_size}"),
        (kv % world_size if world_size <= kv else world_size % kv, f"its {kv} KV heads"),
    ]
    for remainder, what in checks:
        if remainder:
            raise EngineConfigError(
                f"{flag} does not divide {what} ({mc.num_heads} heads, {kv} KV heads); "
                "pick a --tensor-parallel-size that divides them, or 1"
            )


def check_tensor_parallel_config(config, device: torch.device) -> None:
    """Settings that tensor parallelism does not serve (EngineConfigError naming the flag)."""
    n = config.tensor_parallel_size
    if n < 1:
        raise EngineConfigError(f"--tensor-parallel-size {n}: must be 1 or more")
    if n == 1:
        return
    if config.enable_lora:
        raise EngineConfigError(f"--enable-lora is not supported with --tensor-parallel-size {n}")
    if config.quantization not in ("auto", "none"):
        raise EngineConfigError(
            f"--quantization {config.quantization} is not supported with --tensor-parallel-size "
            f"{n}; use --quantization none (dense weights)"
        )
    if config.collective_timeout <= 0:
        raise EngineConfigError(
            f"--collective-timeout {config.collective_timeout:g} must be more than 0 seconds"
        )
    if device.type == "cuda" and torch.cuda.device_count() < n:
        raise EngineConfigError(
            f"--tensor-parallel-size {n} needs {n} GPUs, {torch.cuda.device_count()} visible "
            "(CUDA_VISIBLE_DEVICES)"
        )


def rank_model_config(model_config, tp: TensorParallel):
    """The numbers of one rank's decoder layers: its heads, KV heads and MLP slice."""
    if not tp.enabled:
        return model_config
    kv_start, kv_stop = tp.kv_heads(model_config.num_kv_heads)
    return dataclasses.replace(
        model_config,
        num_heads=model_config.num_heads // tp.world_size,
        num_kv_heads=kv_stop - kv_start,
        intermediate_size=model_config.intermediate_size // tp.world_size,
    )


def rank_device(device: torch.device, placement: RankPlacement) -> torch.device:
    """CUDA rank r runs on GPU r (of those visible); the CPU is shared."""
    if device.type != "cuda" or placement.world_size == 1:
        return device
    return torch.device("cuda", placement.rank)


def init_tensor_parallel(
    placement: RankPlacement, device: torch.device, timeout_s: float
) -> TensorParallel:
    """Join the process group of every rank (a FileStore rendezvous in the run directory;
    gloo on loopback); collectives raise after `timeout_s` instead of hanging.

    NOTE: the rendezvous waits up to STARTUP_TIMEOUT_S (a rank may start slowly on a busy
    host); the steps' collectives run in a group of their own with `timeout_s`."""
    if placement.world_size == 1:
        return TensorParallel(placement)
    assert placement.run_dir is not None
    if device.type == "cpu":
        # NOTE: the ranks share the machine's cores: one thread each, so they do not fight.
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(device)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # NOTE: never a public interface
    store = dist.FileStore(str(Path(placement.run_dir) / STORE_FILE), placement.world_size)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        store=store,
        rank=placement.rank,
        world_size=placement.world_size,
        timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S),
    )
    group = dist.new_group(
        ranks=list(range(placement.world_size)), timeout=datetime.timedelta(seconds=timeout_s)
    )
    log.info("tensor-parallel rank %d of %d joined", placement.rank, placement.world_size)
    return TensorParallel(placement, store, group)
