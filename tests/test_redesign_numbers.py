"""Same numbers after the composable redesign: every traced config trains step for step as before.

``tests/data/loss_traces.json`` was recorded (``tests/loss_trace.py``) with the implementation that
predates the redesign (subclasses per method and a patched Detectron2). The traces are computed
again in a fresh process, in the recorded order (TorchScript's optimisation state depends on what
ran before in a process), and must be equal to the last bit.
"""
import json
import os
import subprocess
import sys

import pytest

from loss_trace import CASES, TRACES

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def traces_now():
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "loss_trace.py"), "--print"],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_losses_step_for_step_as_before_the_redesign(name, traces_now):
    with open(TRACES) as f:
        recorded = json.load(f)[name]
    assert traces_now[name] == recorded
