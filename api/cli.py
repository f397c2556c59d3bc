"""`tokenmill serve [MODEL]`: vLLM's flag names, parsed into the engine and server configs."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from api.engine_flags import QUANTIZATIONS, add_engine_args  # noqa: F401 (QUANTIZATIONS: tests)
from api.lifecycle import run, serve
from api.lora_flags import add_lora_args, parse_lora_modules, runtime_lora_updating
from api.responses_store import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES
from api.startup_checks import StartupError, check_serve_flags, reserve_port
from api.tool_flags import add_tool_args

log = logging.getLogger("tokenmill")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference server.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible API")
    serve.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="a .gguf file or an HF folder (default: embedded SmolLM2-135M)",
    )
    serve.add_argument("--model", default=None, help="same as MODEL")
    _add_server_args(serve)
    add_engine_args(serve)
    add_tool_args(serve)
    add_lora_args(serve)
    return parser


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("TOKENMILL_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/* (env TOKENMILL_API_KEY)",
    )
    p.add_argument("--served-model-name", default=None)
    p.add_argument(
        "--disable-ui", action="store_true", help="no web console at / and /ui (the API only)"
    )
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument(
        "--responses-store-max-entries",
        type=int,
        default=DEFAULT_MAX_ENTRIES,
        help="responses kept for previous_response_id and GET /v1/responses/{id} (LRU; 0: none)",
    )
    p.add_argument(
        "--responses-store-max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="bytes of JSON the responses store holds at most (LRU)",
    )
    p.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error", "critical")
    )
    _add_operations_args(p)


def _add_operations_args(p: argparse.ArgumentParser) -> None:
    """Shutdown, cost attribution and logs: what an operator tunes."""
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT: seconds running requests get to finish before they are "
        "aborted (a second signal stops at once)",
    )
    p.add_argument(
        "--max-feature-tags",
        type=int,
        default=64,
        help="distinct cost-attribution feature labels (X-Feature header or "
        'metadata.feature); beyond them requests count as "other"',
    )
    p.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="log one JSON line per finished request (ids, feature, token counts, "
        "gpu_seconds, TTFT, e2e, finish reason; never the prompt)",
    )
    p.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="no engine stats line every 10 s while busy",
    )


def lora_modules(values: list[str]) -> tuple[tuple[str, str], ...]:
    try:
        return parse_lora_modules(values)
    except ValueError as e:
        startup_error(str(e))


def speculative_config(text: str | None):
    from model_runner.config import EngineConfigError
    from model_runner.spec_config import parse_speculative_config

    if text is None:
        return None
    try:
        return parse_speculative_config(text)
    except EngineConfigError as e:
        startup_error(str(e))


def startup_error(message: str) -> None:
    """A start-up error the user can fix: one line on stderr, exit status 2. Called while an
    exception is handled, its traceback is logged first, at debug level."""
    if sys.exc_info()[1] is not None:
        log.debug("start-up error", exc_info=True)
    print(f"tokenmill: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def tool_config(args: argparse.Namespace):
    """The ToolConfig of the tool flags; loads the plugin first, so its parsers resolve."""
    from api.tool_parsers import get_tool_parser, load_tool_parser_plugin
    from api.tools import ToolConfig

    if args.tool_parser_plugin:
        try:
            load_tool_parser_plugin(args.tool_parser_plugin)
        except Exception as e:  # the plugin is the user's code: any error is theirs
            startup_error(f"--tool-parser-plugin {args.tool_parser_plugin}: {e}")
    if args.tool_call_parser:
        try:
            get_tool_parser(args.tool_call_parser)
        except ValueError as e:
            startup_error(f"--tool-call-parser: {e}")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        startup_error("--enable-auto-tool-choice requires --tool-call-parser")
    return ToolConfig(
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
    )


def chat_template_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return open(path, encoding="utf-8").read()
    except OSError as e:
        startup_error(f"--chat-template {path}: {e.strerror or e}")


def engine_config(args: argparse.Namespace):
    """The frozen EngineConfig of parsed `serve` arguments."""
    from model_runner.config import EngineConfig

    if args.model_tag and args.model and args.model_tag != args.model:
        startup_error(f"MODEL {args.model_tag!r} and --model {args.model!r} differ")
    dtype = {"float": "float32", "half": "float16"}.get(args.dtype, args.dtype)
    return EngineConfig(
        model=args.model_tag or args.model,
        load_format=args.load_format,
        dtype=dtype,
        quantization=args.quantization,
        device=args.device,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        async_scheduling=args.async_scheduling,
        seed=args.seed,
        max_logprobs=args.max_logprobs,
        enforce_eager=args.enforce_eager,
        cpu_packed_batch=args.cpu_packed_batch,
        cpu_int4_max_rows=args.cpu_int4_max_rows,
        cpu_quant_kernel=args.cpu_quant_kernel,
        batch_invariant=args.batch_invariant,
        served_model_name=args.served_model_name,
        max_waiting=args.max_waiting,
        hf_config_path=args.hf_config_path,
        structured_outputs_timeout=args.structured_outputs_timeout,
        skip_tokenizer_init=args.skip_tokenizer_init,
        enable_lora=args.enable_lora,
        lora_modules=lora_modules(args.lora_modules),
        max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        allow_runtime_lora_updating=runtime_lora_updating(args.allow_runtime_lora_updating),
        speculative_config=speculative_config(args.speculative_config),
        tensor_parallel_size=args.tensor_parallel_size,
        collective_timeout=args.collective_timeout,
    )


def check_engine_config(cfg) -> None:
    """Fail fast on a start-up error the user caused (bad model path or file, format,
    quantization, device) before any process starts; reads no weights. NOTE: the engine
    checks all of it again, and what needs the model's metadata (context length, KV cache
    size) only it checks."""
    from model_runner.config import EngineConfigError, resolve_device
    from model_runner.gguf_loader import model_config_from_gguf, open_gguf
    from model_runner.kv_cache import check_kv_cache_dtype
    from model_runner.linear_plan import check_quantization
    from model_runner.lora import check_lora_config
    from model_runner.model_source import (
        check_gguf_architecture,
        check_tokenizer_files,
        model_config_from_hf,
        resolve_model,
    )
    from model_runner.parallel import check_tensor_parallel_config, check_tensor_parallel_shape
    from model_runner.quant.checkpoint_quant import read_checkpoint_quant

    try:
        source = resolve_model(cfg)
        check_quantization(cfg.quantization, resolve_device(cfg), source.format,
                           read_checkpoint_quant(source.config_path),
                           cfg.tensor_parallel_size)  # fmt: skip
        check_lora_config(cfg)
        check_kv_cache_dtype(cfg, resolve_device(cfg))
        check_tensor_parallel_config(cfg, resolve_device(cfg))
        model_config = None
        if source.config_path.suffix == ".json":
            model_config = model_config_from_hf(source.config_path)
        elif source.format == "gguf":
            check_gguf_architecture(source.path)
            if cfg.tensor_parallel_size > 1:
                model_config = model_config_from_gguf(open_gguf(source.path))
        if model_config is not None:
            check_tensor_parallel_shape(model_config, cfg.tensor_parallel_size)
        if not cfg.skip_tokenizer_init:
            check_tokenizer_files(source)
    except EngineConfigError as e:
        startup_error(str(e))


def server_config(args: argparse.Namespace):
    from api.server import ServerConfig
    from api.stats_log import STATS_LOG_INTERVAL_S

    return ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_logprobs=args.max_logprobs,
        tool_config=tool_config(args),
        chat_template=chat_template_text(args.chat_template),
        trust_request_chat_template=args.trust_request_chat_template,
        max_feature_tags=args.max_feature_tags,
        enable_log_requests=args.enable_log_requests,
        log_stats_interval=None if args.disable_log_stats else STATS_LOG_INTERVAL_S,
        shutdown_timeout=args.shutdown_timeout,
        enable_ui=not args.disable_ui,
        responses_store_max_entries=args.responses_store_max_entries,
        responses_store_max_bytes=args.responses_store_max_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (`tokenmill`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from api.server import tokenmill_version

        print(tokenmill_version())
        return 0
    if args.command != "serve":
        parser.print_help()
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        check_serve_flags(args)
    except StartupError as e:
        startup_error(str(e))
    engine_cfg = engine_config(args)
    check_engine_config(engine_cfg)
    server_cfg = server_config(args)
    try:
        listener = reserve_port(args.host, args.port)
    except StartupError as e:
        startup_error(str(e))
    return serve_until_stopped(engine_cfg, server_cfg, listener)


def serve_until_stopped(engine_cfg, server_cfg, listener) -> int:
    """The exit code of the server; settings the engine refuses at start exit 2, one line."""
    from model_runner.config import EngineConfigError

    try:
        return run(serve(engine_cfg, server_cfg, listener))
    except EngineConfigError as e:
        startup_error(str(e))


if __name__ == "__main__":
    sys.exit(main())
