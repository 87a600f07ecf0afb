"""This CPU's measured matmul rate: the FLOP bound the training and scoring benchmarks compare against."""
import time

import torch


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.5) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
