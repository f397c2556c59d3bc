"""The device time of one model step, which the scheduler splits among its requests.

On a GPU it is measured with CUDA events around the step's kernels (the device's own clock,
not a host timer around asynchronous launches); on the CPU the step's wall time is its
device time.
"""

from __future__ import annotations

import time

import torch


class StepTimer:
    """`start()` before the step's first kernel, `stop()` after its results are on the host."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            self._begin.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since `start()` on the device."""
        if not self.cuda:
            return time.perf_counter() - self._t0
        self._end.record()
        self._end.synchronize()  # NOTE: cheap: the sampled tokens were already copied back
        return self._begin.elapsed_time(self._end) / 1000.0
