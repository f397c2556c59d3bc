"""Start-up checks that need no model: flag ranges and contradictions, the listening port.

They run before any model is read or worker process started, so a mistyped flag fails in
about a second. Each failure is a StartupError whose message names the flag and what to
change; `api.cli` prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import errno
import socket

# NOTE: the kernels take any block size; these are vLLM's choices, the ones tested here.
SUPPORTED_BLOCK_SIZES = (8, 16, 32, 64, 128)


class StartupError(ValueError):
    """A start-up error the user caused; the message says which flag or path to change."""


def check_serve_flags(args: argparse.Namespace) -> None:
    """Every `serve` flag within its range and consistent with the others (StartupError)."""
    if args.model_tag and args.model and args.model_tag != args.model:
        raise StartupError(f"MODEL {args.model_tag!r} and --model {args.model!r} differ")
    _check_at_least("--port", args.port, 1)
    _check_at_most("--port", args.port, 65535)
    for flag, value in (
        ("--max-num-seqs", args.max_num_seqs),
        ("--max-num-batched-tokens", args.max_num_batched_tokens),
        ("--max-model-len", args.max_model_len),
        ("--max-waiting", args.max_waiting),
    ):
        _check_at_least(flag, value, 1)
    for flag, value in (
        ("--max-logprobs", args.max_logprobs),
        ("--max-feature-tags", args.max_feature_tags),
        ("--shutdown-timeout", args.shutdown_timeout),
        ("--cpu-packed-batch", args.cpu_packed_batch),
    ):
        _check_at_least(flag, value, 0)
    _check_at_least("--cpu-int4-max-rows", args.cpu_int4_max_rows, -1)
    _check_positive("--kv-cache-memory", args.kv_cache_memory, "GiB")
    _check_positive("--structured-outputs-timeout", args.structured_outputs_timeout, "seconds")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise StartupError(
            f"--gpu-memory-utilization {args.gpu_memory_utilization:g} is outside (0, 1]: "
            "it is the fraction of GPU memory to use, e.g. 0.9"
        )
    _check_block_size(args.block_size)
    if args.hf_config_path is not None and args.load_format != "dummy":
        raise StartupError(
            "--hf-config-path is read only with --load-format dummy; drop it, or add "
            "--load-format dummy"
        )


def _check_at_least(flag: str, value: int | float | None, low: int) -> None:
    if value is not None and value < low:
        raise StartupError(f"{flag} {value:g} is below {low}; use {flag} {low} or more")


def _check_at_most(flag: str, value: int, high: int) -> None:
    if value > high:
        raise StartupError(f"{flag} {value} is above {high}; use {flag} {high} or less")


def _check_positive(flag: str, value: float | None, unit: str) -> None:
    if value is not None and not value > 0:
        raise StartupError(f"{flag} {value:g} must be more than 0 {unit}")


def _check_block_size(block_size: int) -> None:
    choices = ", ".join(map(str, SUPPORTED_BLOCK_SIZES))
    if block_size < 1 or block_size & (block_size - 1):
        raise StartupError(f"--block-size {block_size} is not a power of two; one of {choices}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise StartupError(f"--block-size {block_size} is not supported; one of {choices}")


def reserve_port(host: str, port: int) -> socket.socket:
    """The server's socket, bound now (as hypercorn binds) and served on once the model is
    loaded: a port in use fails before the load, and no one can take it during the load.

    NOTE: bound, not listening: until hypercorn listens, connections are refused as before.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except socket.gaierror as e:
        sock.close()
        raise StartupError(f"--host {host}: not a known address ({e.strerror})") from e
    except OSError as e:
        sock.close()
        raise StartupError(_bind_error_message(host, port, e)) from e
    return sock


def _bind_error_message(host: str, port: int, error: OSError) -> str:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return (
            f"--port {port}: {address} is already in use; stop what serves there or pick "
            "another --port"
        )
    if error.errno == errno.EACCES:
        return (
            f"--port {port}: permission denied binding {address} (ports below 1024 need "
            "privileges); pick --port 1024 or above"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine; use 127.0.0.1 or 0.0.0.0"
    return f"--host {host} --port {port}: cannot bind {address}: {error.strerror or error}"
