"""What every benchmark row is made of: interleaved rounds of a primitive
and its floor, and the row that compares them."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, NamedTuple, Optional

__all__ = ["FULL", "QUICK", "Row", "Settings", "Timer", "interleaved", "latency_row", "timer"]

Timer = Callable[[int], float]  # runs n operations, returns the seconds they took


class Row(NamedTuple):
    name: str
    value: float
    floor: Optional[float]
    unit: str
    ratio: Optional[float]  # value / floor, or floor / value for rates
    target: str
    ok: Optional[bool]


class Settings(NamedTuple):
    rounds: int
    ops: int
    contended_seconds: float
    orphans: int
    tree_files: int
    burst_records: int


FULL = Settings(rounds=7, ops=2000, contended_seconds=1.0, orphans=1000, tree_files=20000, burst_records=5000)
QUICK = Settings(rounds=3, ops=200, contended_seconds=0.2, orphans=100, tree_files=2000, burst_records=500)


def interleaved(contenders: Dict[str, Timer], rounds: int, ops: int) -> Dict[str, float]:
    """Median seconds per operation of each contender, run in turn each round."""
    samples: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, timer in contenders.items():
            samples[name].append(timer(ops) / ops)
    return {name: statistics.median(values) for name, values in samples.items()}


def latency_row(name: str, times: Dict[str, float], limit: Optional[float]) -> Row:
    value, floor = times["primitive"], times["floor"]
    ratio = value / floor
    target = f"<= {limit:g}x" if limit else ""
    return Row(name, value * 1e6, floor * 1e6, "us", ratio, target, None if limit is None else ratio <= limit)


def timer(operation: Callable[[], object]) -> Timer:
    def timed(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            operation()
        return time.perf_counter() - start

    return timed
