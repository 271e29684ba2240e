"""Long calls (issue 9, items 7 and 8): Ctrl-C stops a large angle or photonic call, forward and backward, on the cpp
and torch backends within a few seconds, and the angle loss warns once about its O(N^3) cost.

Each Ctrl-C test runs one child process that goes through several phases. In each, the child starts a call sized to
run for a minute or more, the parent sends SIGINT about a second in, and the child must raise KeyboardInterrupt well
before the call could have finished, then still compute a small loss correctly (nothing left half-done). The last
phase lets the KeyboardInterrupt end the child. The child is killed in `finally` whatever happens.
"""

import os
import select
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import qrkd
from qrkd import functional

# SIGINT to KeyboardInterrupt in the child, the time the parent allows (the calls below run for a minute or more)
DEADLINE_S = 5.0

CHILD = r"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # also if the parent runs with SIGINT ignored
import torch, qrkd
from qrkd import PhotonicFidelityKernel
from qrkd.backends import reference

torch.set_num_threads(2)
backend, phases = sys.argv[1], sys.argv[2].split(",")
g = torch.Generator().manual_seed(0)


def features(n, d, dtype=torch.float32):
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


def matrices(n_rows, photons, modes):
    return torch.view_as_complex(torch.randn(n_rows, photons, modes, 2, generator=g)) / modes**0.5


leaves = []  # the inputs of the interrupted call: an interrupted backward must leave their .grad untouched


def still_right():
    assert all(leaf.grad is None for leaf in leaves), "an interrupted backward wrote a gradient"
    leaves.clear()
    s, t = features(9, 3, torch.float64), features(9, 4, torch.float64)
    got = qrkd.rkd_angle_loss(s, t, backend=backend)
    want = qrkd.rkd_angle_loss(s, t, backend="reference")
    assert abs(got.item() - want.item()) <= 1e-10 * want.item(), (got, want)
    P = matrices(5, 3, 4).to(torch.complex128)
    torch.testing.assert_close(qrkd.photonic_fidelity(P, backend=backend), reference.photonic_fidelity(P))


def run(phase):
    kind, n, *photons = phase.split(":")
    n, photons = int(n), int(photons[0]) if photons else 10
    if kind == "angle":  # forward (the cpp op computes the student gradient in the same pass)
        s = features(n, 4).requires_grad_(True)
        t = features(n, 31)
        print("started", flush=True)
        qrkd.rkd_angle_loss(s, t, backend=backend)
    elif kind == "angle_backward":
        s = features(n, 4).requires_grad_(True)
        leaves.append(s)
        loss = qrkd.rkd_angle_loss(s, features(n, 31), backend=backend)
        print("started", flush=True)
        loss.backward()
    elif kind == "photonic":
        P = matrices(n, photons, photons + 1)
        print("started", flush=True)
        qrkd.photonic_fidelity(P, backend=backend)
    elif kind == "photonic_backward":
        P = matrices(n, photons, photons + 1).requires_grad_(True)
        leaves.append(P)
        K = qrkd.photonic_fidelity(P, backend=backend)
        print("started", flush=True)
        K.sum().backward()
    else:
        raise ValueError(phase)


for i, phase in enumerate(phases):
    start = time.monotonic()
    try:
        run(phase)
    except KeyboardInterrupt:
        print(f"interrupted {phase} after {time.monotonic() - start:.2f} s", flush=True)
        still_right()
        print("recovered", flush=True)
        if i == len(phases) - 1:
            raise
        continue
    print(f"finished {phase} uninterrupted in {time.monotonic() - start:.2f} s", flush=True)
"""

# kind:N[:photons] (10 photons by default). Uninterrupted, the forward phases run for a minute or more. A backward
# phase first runs its forward (seconds): the cpp angle op has no separate backward (its forward computes the gradient
# when the student requires one, as here); the cpp photonic backward costs about 4 forwards, the torch one about 5,
# so that phase runs for only a few times DEADLINE_S on an idle machine: at N = 700 the cpp backward took 0.8 s on a
# Zen 4 core pair and finished before the signal (sent 1 s after "started"); N = 2000 has 8x the pairs.
PHASES = {
    "cpp": ["angle:4000", "photonic:3000", "photonic_backward:2000"],
    "torch": ["angle:1600", "photonic:600", "photonic_backward:800:5"],  # angle: the gradient comes with the forward
}


def _read_line(proc, deadline):
    """The child's next stdout line, or None when the deadline (time.monotonic()) passes first."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line:
                return None
            return line.strip()


@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if b in qrkd.available_backends()])
def test_ctrl_c_stops_long_calls(backend):
    phases = PHASES[backend]
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, backend, ",".join(phases)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for phase in phases:
            line = _read_line(proc, time.monotonic() + 180)
            assert line == "started", f"{phase}: the child said {line!r} instead of starting"
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            line = _read_line(proc, sent + DEADLINE_S)
            waited = time.monotonic() - sent
            assert line is not None and line.startswith(f"interrupted {phase}"), (
                f"{backend} {phase}: no KeyboardInterrupt within {DEADLINE_S} s of SIGINT (got {line!r})"
            )
            assert waited < DEADLINE_S
            assert _read_line(proc, time.monotonic() + 60) == "recovered", f"{backend} {phase}: wrong result afterwards"
        proc.wait(timeout=30)
        stderr = proc.stderr.read()
        assert proc.returncode != 0 and "KeyboardInterrupt" in stderr, stderr[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# ------------------------------------------------------------------------------------------------------ cost guard


@pytest.fixture
def fresh_cost_warning(monkeypatch):
    monkeypatch.setattr(functional, "_angle_cost_warned", False)
    monkeypatch.setattr(functional, "ANGLE_TRIPLETS_WARNING", 500)  # 8^3 = 512 triplets: "huge" here


def test_angle_cost_warning_once_with_the_estimate_and_anchors(fresh_cost_warning):
    s, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qrkd.rkd_angle_loss(s[:7], t[:7], backend="reference")  # 343 triplets: silent
        qrkd.rkd_angle_loss(s, t, anchors=(0, 7), backend="reference")  # 7 * 64 = 448: silent
    with pytest.warns(RuntimeWarning, match=r"N=8 means 512 triplets.*anchors=\(start, stop\)"):
        qrkd.rkd_angle_loss(s, t, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        qrkd.rkd_angle_loss(s, t, backend="reference")
        qrkd.rkd_angle_loss(torch.randn(9, 3), torch.randn(9, 3), backend="reference")


def test_angle_cost_warning_points_at_the_callers_line(fresh_cost_warning):
    with pytest.warns(RuntimeWarning) as record:
        qrkd.rkd_angle_loss(torch.randn(9, 2), torch.randn(9, 2), backend="reference")
    assert record[0].filename == __file__


def test_default_threshold_is_about_n_4600():
    assert 4500**3 < functional.ANGLE_TRIPLETS_WARNING < 4700**3
    assert "anchors" in qrkd.rkd_angle_loss.__doc__ and "once per process" in qrkd.rkd_angle_loss.__doc__
