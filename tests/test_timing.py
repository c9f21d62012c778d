"""`lightning_hybrid.timing.Stopwatch`: host clocks on CPU; CUDA events read one step later
(stand-in events here: the GPU path is the lag and the sums, the events are torch's)."""

from __future__ import annotations

import time

import pytest
import torch

from lightning_hybrid.timing import Stopwatch


class FakeEvent:
    """A CUDA event's interface on a fake clock: ``record`` stamps the clock, ``synchronize`` notes it ran."""

    clock = 0.0
    synced: list[float] = []

    def __init__(self) -> None:
        self.at: float | None = None

    def record(self) -> None:
        self.at = FakeEvent.clock

    def synchronize(self) -> None:
        FakeEvent.synced.append(self.at)

    def elapsed_time(self, end: FakeEvent) -> float:  # milliseconds, as torch's
        return (end.at - self.at) * 1000.0


def test_cpu_laps_are_this_steps_host_time() -> None:
    watch = Stopwatch("cpu")
    with watch.span("step"):
        watch.start("inner")
        time.sleep(0.02)
        watch.stop("inner")
    times = watch.lap()
    assert 0.02 <= times["inner"] <= times["step"] < 0.5
    assert watch.lap() == {}  # a new, empty lap


def test_cuda_laps_are_read_one_step_late_and_sum_per_name() -> None:
    FakeEvent.clock, FakeEvent.synced = 0.0, []
    watch = Stopwatch(torch.device("cuda", 0), event_factory=FakeEvent)
    assert watch.lag == 1
    for step, (a, b) in enumerate([(1.0, 3.0), (10.0, 15.0)]):
        FakeEvent.clock = a
        watch.start("phase")
        FakeEvent.clock = a + 0.5
        watch.stop("phase")  # two spans of one name in a lap are summed
        watch.start("phase")
        FakeEvent.clock = b
        watch.stop("phase")
        due = watch.lap()
        if step == 0:
            assert due == {}  # nothing is due after the first step: no wait on its own events
        else:
            assert due == pytest.approx({"phase": 0.5 + 1.5})  # the first step's spans
            assert FakeEvent.synced == [3.0]  # waited on the previous lap's last event only
    watch.discard()
    assert watch.lap() == pytest.approx({"phase": 0.5 + 4.5})  # the second step's, read at the third


@pytest.mark.parametrize(
    ("name", "precision", "tf32", "peak"),
    [
        ("NVIDIA H200", "bf16-mixed", False, 989e12),  # Lightning's table lacks a bare "H200": ours
        ("NVIDIA H200", "32-true", False, 67e12),  # an fp32 run is not rated against the bf16 peak
        ("NVIDIA H200", "32-true", True, 494e12),  # TF32 matmuls when torch allows them
        ("NVIDIA H100 PCIe", "bf16-mixed", False, 756e12),  # Lightning's: PCIe is not SXM (989)
        ("Some Future GPU", "bf16-mixed", False, None),
    ],
)
def test_peak_flops_follow_the_device_and_the_precision(monkeypatch: pytest.MonkeyPatch, name: str, precision: str, tf32: bool, peak: float | None) -> None:
    from lightning_hybrid.callbacks.monitor import detect_peak_flops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high" if tf32 else "highest")
    got = detect_peak_flops(torch.device("cuda", 0), precision)
    assert got == (pytest.approx(peak, rel=0.01) if peak is not None else None)
    assert detect_peak_flops(torch.device("cpu"), precision) is None
