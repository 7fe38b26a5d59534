"""Interleaved timing: every candidate is timed in each round, so machine noise hits all of them alike."""

from __future__ import annotations

import statistics
import time


def interleaved(candidates: dict, number: int, rounds: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median over rounds of the mean time per call (seconds) of each zero-argument callable."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - t0) / number)
    return {name: statistics.median(s) for name, s in samples.items()}


def report(title: str, times: dict[str, float], ours: str, unit: float = 1e-6, unit_name: str = "us") -> dict:
    """Print each candidate's time and the ratio of ``ours`` to it; return the ratios."""
    print(f"\n{title}")
    ratios = {}
    for name, t in times.items():
        line = f"  {name:<28} {t / unit:10.2f} {unit_name}"
        if name != ours:
            ratios[name] = times[ours] / t
            line += f"   lamina / this = {ratios[name]:.3f}"
        print(line)
    return ratios
