"""StepTimer: the device's time for a step (CUDA events on a GPU, wall time on the CPU)."""

from __future__ import annotations

import time

import pytest
import torch

from model_runner.step_timer import StepTimer


def test_cpu_step_time_is_its_wall_time():
    clock = StepTimer(torch.device("cpu")).start()
    time.sleep(0.05)
    clock.end()
    assert 0.05 <= clock.seconds() < 1.0


def test_cpu_step_time_leaves_out_another_steps_work_inside_it():
    clock = StepTimer(torch.device("cpu")).start()
    time.sleep(0.03)
    inner = time.perf_counter()
    time.sleep(0.05)  # the previous step's collect
    clock.exclude(time.perf_counter() - inner)
    clock.end()
    assert 0.03 <= clock.seconds() < 0.05


@pytest.mark.gpu
def test_cuda_step_time_comes_from_events_not_the_host():
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    clock = StepTimer(torch.device("cuda")).start()
    host_start = time.perf_counter()
    for _ in range(20):
        a = a @ a.T / 64
    launched = time.perf_counter() - host_start  # launches return before the kernels ran
    clock.end()
    device = clock.seconds()
    host = time.perf_counter() - host_start
    assert 0 < device <= host and device > launched
