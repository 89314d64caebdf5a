"""Timing: the clocks and the round-robin loop behind every published number.

The main job (``python -m gpulayers``) and the scripts' harness (``scripts/harness.py``)
both time with these, so there is one CUDA-event timer and one way of alternating
implementations:

- :class:`CPUClock`: wall time of one call (``time.perf_counter``), for NumPy and
  PyTorch CPU;
- :class:`CupyClock`: device time between two CUDA events on CuPy's current stream.
  CuPy and PyTorch both default to the legacy default stream, so these events also
  time PyTorch's CUDA work in order (the scripts time PyTorch's peers with it);
- :class:`Timed` and :func:`round_robin`: warm-up, then every implementation once per
  round in a rotating order, so drift (turbo, thermal, other processes) hits all
  alike; :func:`median` of the samples is what gets reported; :func:`medians` is the
  same loop over a ``{name: fn}`` dict.

Neither CuPy nor PyTorch is imported at module import time.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

__all__ = ["CPUClock", "CupyClock", "Timed", "round_robin", "median", "medians"]


class CPUClock:
    """Wall time of one call, ``time.perf_counter``; for NumPy and PyTorch CPU."""

    kind = "cpu"

    def time_ms(self, fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def sync(self):
        pass


class CupyClock:
    """Device time between two CUDA events on CuPy's current stream."""

    kind = "cuda"

    def __init__(self):
        import cupy
        self._cp = cupy
        self._start = cupy.cuda.Event()
        self._end = cupy.cuda.Event()

    def time_ms(self, fn):
        """ms of one call, the events around it (its host work included)."""
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        return float(self._cp.cuda.get_elapsed_time(self._start, self._end))

    def pipelined_ms(self, fn, n=20):
        """ms per call of ``n`` calls back to back after one untimed call (host work
        overlaps the device's)."""
        fn()
        self._start.record()
        for _ in range(n):
            fn()
        self._end.record()
        self._end.synchronize()
        return float(self._cp.cuda.get_elapsed_time(self._start, self._end)) / n

    def host_us(self, fn, n=20):
        """us of host time per call of ``n`` calls (no synchronisation between them)."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        self.sync()
        return (t1 - t0) / n * 1e6

    def sync(self):
        self._cp.cuda.Device().synchronize()


@dataclass
class Timed:
    """One implementation to time: ``fn()`` runs it once; ``reps`` caps its
    samples (the naive loops get fewer); ``error`` is set when it raised."""

    name: str
    fn: object
    clock: object
    reps: int | None = None
    error: str | None = None
    samples: list = field(default_factory=list)


def round_robin(entries, reps, warmup=2, on_round=None):
    """Time ``entries`` (a list of :class:`Timed`) alternately.

    Each entry first runs ``warmup`` times untimed (compiles kernels, fills
    allocator caches, faults pages in). Then ``reps`` rounds follow; round r
    runs every entry once, starting at entry ``r % len(entries)``. An entry
    that raises gets ``error`` set and drops out; the others go on.

    Returns ``entries`` with ``samples`` (milliseconds) filled in.
    """
    def attempt(e, timed):
        try:
            if timed:
                e.samples.append(e.clock.time_ms(e.fn))
            else:
                e.fn()
                e.clock.sync()
        except Exception as exc:  # record and go on with the others
            e.error = f"{type(exc).__name__}: {exc}"[:500]

    for e in entries:
        for _ in range(warmup if (e.reps is None or e.reps > 2) else min(warmup, 1)):
            if e.error is None:
                attempt(e, timed=False)
    n = len(entries)
    for r in range(reps):
        for k in range(n):
            e = entries[(r + k) % n]
            if e.error is None and (e.reps is None or len(e.samples) < e.reps):
                attempt(e, timed=True)
        if on_round is not None:
            on_round()
    return entries


def median(samples):
    return float(statistics.median(samples)) if samples else float("nan")


def medians(fns, clock, reps, warmup=2):
    """{name: median ms, or the error string} of :func:`round_robin` over ``fns``, a
    ``{name: zero-argument callable}`` dict, all timed by ``clock``."""
    entries = round_robin([Timed(name, fn, clock) for name, fn in fns.items()], reps, warmup)
    return {e.name: (e.error if e.error is not None else median(e.samples)) for e in entries}
