"""Which actor classes exist and what each needs to be built."""

from __future__ import annotations

from actors.actor import Actor
from actors.protocol import RANK_EXECUTOR_PREFIX, rank_executor_name
from actors.transport import Transport

# Production placement: the model step never shares a GIL with HTTP, tokenizing or
# detokenizing; scheduler and executor share a process (one hop per step).
DEFAULT_PLACEMENT: dict[str, list[str]] = {
    "engine": ["scheduler", "executor"],
    "tokenizer": ["tokenizer"],
    "detokenizer": ["detokenizer"],
}


def placement_for(config) -> dict[str, list[str]]:
    """DEFAULT_PLACEMENT, plus one process per extra tensor-parallel rank (`rank1`, ...):
    rank 0's executor stays beside the scheduler. NOTE: a pipeline stage would add its
    ranks here the same way."""
    ranks = getattr(config, "tensor_parallel_size", 1)
    extra = {f"rank{r}": [rank_executor_name(r)] for r in range(1, ranks)}
    return {**DEFAULT_PLACEMENT, **extra}


def runs_model(actor_names: list[str]) -> bool:
    """The process holds an executor (of any rank)."""
    return any(n == "executor" or n.startswith(RANK_EXECUTOR_PREFIX) for n in actor_names)


def _rank_placement(config, rank: int, transport: Transport):
    from model_runner.parallel import RankPlacement

    run_dir = getattr(transport, "run_dir", None)
    return RankPlacement(
        rank, config.tensor_parallel_size, None if run_dir is None else str(run_dir)
    )


def tokenizer_loader(config):
    """A zero-argument callable that loads the model's tokenizer (run off the loop); it
    returns None under `skip_tokenizer_init`."""

    def load():
        if getattr(config, "skip_tokenizer_init", False):
            return None
        from model_runner.model_source import load_tokenizer, resolve_model

        return load_tokenizer(resolve_model(config))

    return load


def prepare_engine_process(config) -> None:
    """Process-wide settings for the process that runs model steps; call before any thread.

    On the CPU: glibc keeps freed activation memory for reuse (see model_runner/cpu_malloc).
    """
    from model_runner.config import resolve_device
    from model_runner.cpu_malloc import keep_freed_memory

    if resolve_device(config).type == "cpu":
        keep_freed_memory()


def build_actor(name: str, transport: Transport, config) -> Actor:
    """Construct the actor called `name`; imports stay lazy so each process loads only its own."""
    if name == "tokenizer":
        from actors.tokenizer import TokenizerActor

        return TokenizerActor(transport, tokenizer_loader(config))
    if name == "detokenizer":
        from actors.detokenizer import DetokenizerActor

        return DetokenizerActor(transport, tokenizer_loader(config))
    if name == "scheduler":
        from actors.scheduler.actor import SchedulerActor

        return SchedulerActor(transport, config)
    if name.startswith(RANK_EXECUTOR_PREFIX):
        from actors.rank_executor import RankExecutorActor

        rank = int(name.removeprefix(RANK_EXECUTOR_PREFIX))
        placement = _rank_placement(config, rank, transport)

        def make_rank_runner():
            from model_runner.runner import ModelRunner

            return ModelRunner(config, progress=False, placement=placement)

        return RankExecutorActor(transport, rank, make_rank_runner)
    if name == "executor":
        from actors.executor import ExecutorActor

        placement = _rank_placement(config, 0, transport)

        def make_runner():
            from model_runner.runner import ModelRunner

            return ModelRunner(config, placement=placement)

        return ExecutorActor(
            transport,
            make_runner,
            config.structured_outputs_timeout,
            config.grammar_compile_niceness,
        )
    raise ValueError(f"unknown actor {name!r}")
