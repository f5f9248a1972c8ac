"""The CUDA-event timer of the probe scripts in benchmarks/ (run as `python3 benchmarks/<script>.py`,
which puts this folder on the import path)."""
import statistics

import torch


def median_us(fn, warmup: int = 3, iters: int = 30, before=None) -> float:
    """Median GPU time of one `fn()` call in microseconds, over `iters` calls after `warmup` calls,
    each timed alone between two CUDA events; `before()`, if given, runs ahead of each timed call,
    outside the events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)
