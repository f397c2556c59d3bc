"""What the CPU says of itself (Linux /proc/cpuinfo), read once per process."""

from __future__ import annotations

import functools
import platform


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU model name and every feature flag it reports (empty where /proc is absent)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name":
                    name = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    return name, frozenset(flags)
