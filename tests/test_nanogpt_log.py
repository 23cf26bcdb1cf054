"""scripts/nanogpt_update_seconds.py: nanoGPT's update time from its console output, evaluation apart."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from nanogpt_update_seconds import update_seconds  # noqa: E402

LOG = """\
step 0: train loss 4.2000, val loss 4.2100
iter 0: loss 4.1800, time 900.00ms
iter 1: loss 4.0000, time 30.00ms
iter 2: loss 3.9000, time 40.00ms
step 3: train loss 3.5000, val loss 3.6000
saving checkpoint to out
iter 3: loss 3.4000, time 700.00ms
iter 4: loss 3.3000, time 50.00ms
"""


def test_updates_after_an_evaluation_count_at_the_median_update_time():
    result = update_seconds(LOG.splitlines())
    assert result["updates"] == 5
    assert result["median_ms"] == pytest.approx(40.0)
    assert result["update_seconds"] == pytest.approx(0.03 + 0.04 + 0.05 + 2 * 0.04)
    assert result["val_loss"] == 3.6


def test_a_log_without_update_times_is_refused_with_the_option_to_set():
    with pytest.raises(SystemExit, match="--log_interval=1"):
        update_seconds(["step 0: train loss 4.2, val loss 4.2"])
