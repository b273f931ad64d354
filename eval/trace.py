"""Kernels on the GPU's streams while a call runs, read back from a jax.profiler trace.

`gpu_events(call)` runs call() once under the profiler and returns every kernel,
memset and copy the GPU ran as (start_ns, end_ns, name), sorted by start;
`busy_ns(events)` is the union of their intervals (the span minus the idle gaps).
"""
from __future__ import annotations

import glob
import tempfile

import jax


def gpu_events(call) -> list[tuple[int, int, str]]:
    """(start_ns, end_ns, name) of each GPU stream event while call() runs (call is warmed first by the caller)."""
    from jax._src.lib import _profile_data

    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    try:
        jax.block_until_ready(call())
    finally:  # a failing call must not leave the profiler running for the next one
        jax.profiler.stop_trace()
    (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    data = _profile_data.ProfileData.from_file(path)
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" in line.name.lower() and "xla" not in line.name.lower():
                events += [(e.start_ns, e.end_ns, e.name) for e in line.events]
    return sorted(events)


def busy_ns(events) -> float:
    """Union of the events' intervals, ns."""
    busy, cur_s, cur_e = 0.0, None, None
    for a, b, _ in events:
        if cur_e is None or a > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    return busy + (0 if cur_e is None else cur_e - cur_s)
