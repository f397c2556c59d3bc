"""StepTimer: the device's time for a step (CUDA events on a GPU, wall time on the CPU)."""

from __future__ import annotations

import time

import pytest
import torch

from model_runner.step_timer import StepTimer


def test_cpu_step_time_is_its_wall_time():
    timer = StepTimer(torch.device("cpu"))
    timer.start()
    time.sleep(0.05)
    assert 0.05 <= timer.stop() < 1.0


@pytest.mark.gpu
def test_cuda_step_time_comes_from_events_not_the_host():
    timer = StepTimer(torch.device("cuda"))
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    timer.start()
    host_start = time.perf_counter()
    for _ in range(20):
        a = a @ a.T / 64
    launched = time.perf_counter() - host_start  # launches return before the kernels ran
    device = timer.stop()
    host = time.perf_counter() - host_start
    assert 0 < device <= host and device > launched
