"""Entry point of one actor process: `python -m actors.worker --actors a,b ...`.

The supervisor starts it with the engine config as JSON on the command line (no pickle).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import msgspec

from actors.actor import send_heartbeats
from actors.transport import ZmqTransport
from actors.wiring import build_actor, prepare_engine_process, runs_model


async def run_actors(actor_names: list[str], run_dir: str, config) -> None:
    transport = ZmqTransport(run_dir, colocated=tuple(actor_names))
    actors = [build_actor(name, transport, config) for name in actor_names]
    tasks = [asyncio.create_task(a.run(), name=a.name) for a in actors]
    tasks.append(asyncio.create_task(send_heartbeats(transport, actors)))
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        task.result()  # re-raise: a crashed actor ends its process, the supervisor reports it


def main(argv: list[str] | None = None) -> None:
    from model_runner.config import EngineConfig

    parser = argparse.ArgumentParser(prog="tokenmill-worker")
    parser.add_argument("--process", required=True)
    parser.add_argument("--actors", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--log-level", default="INFO", help="the API process's log level")
    args = parser.parse_args(argv)
    # NOTE: Ctrl-C in a terminal signals the whole process group; the API process drains
    # and then stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log_format = f"%(asctime)s {args.process} %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=log_format)
    config = msgspec.json.decode(args.config, type=EngineConfig)
    actor_names = args.actors.split(",")
    if runs_model(actor_names):
        prepare_engine_process(config)  # NOTE: before ZeroMQ's threads take malloc arenas
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(run_actors(actor_names, args.run_dir, config))


if __name__ == "__main__":
    main()
