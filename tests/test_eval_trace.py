"""The profiler-based timer of eval/bench_kernels.py on CPU: no GPU events, a clear
error, the profiler stopped after a failing call, donated state passed along."""
import jax.numpy as jnp
import pytest

from eval.bench_kernels import bench, bench_chain
from eval.trace import busy_ns, gpu_events


def test_busy_is_the_union_of_intervals():
    assert busy_ns([(0, 10, "a"), (5, 12, "b"), (20, 25, "c")]) == 17
    assert busy_ns([]) == 0


def test_failing_call_stops_the_profiler():
    def boom():
        raise ValueError("in the traced call")

    with pytest.raises(ValueError):
        gpu_events(boom)
    assert gpu_events(lambda: jnp.ones(3) + 1) == []  # no GPU here; a second trace starts


def test_device_timer_without_gpu_events_says_so():
    with pytest.raises(RuntimeError, match="GPU events"):
        bench(lambda x: x * 2, [(jnp.ones(8),)], timer="device")
    # donated state: each call consumes the last one's output (no deleted-buffer error first)
    with pytest.raises(RuntimeError, match="GPU events"):
        bench_chain(lambda st, x: st + x, jnp.zeros(8), [(jnp.ones(8),)], timer="device")
