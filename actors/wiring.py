"""Which actor classes exist and what each needs to be built."""

from __future__ import annotations

from actors.actor import Actor
from actors.transport import Transport

# Production placement: the model step never shares a GIL with HTTP, tokenizing or
# detokenizing; scheduler and executor share a process (one hop per step).
DEFAULT_PLACEMENT: dict[str, list[str]] = {
    "engine": ["scheduler", "executor"],
    "tokenizer": ["tokenizer"],
    "detokenizer": ["detokenizer"],
}


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
    if name == "executor":
        from actors.executor import ExecutorActor

        def make_runner():
            from model_runner.runner import ModelRunner

            return ModelRunner(config)

        return ExecutorActor(
            transport,
            make_runner,
            config.structured_outputs_timeout,
            config.grammar_compile_niceness,
        )
    raise ValueError(f"unknown actor {name!r}")
