"""make gpu-check, as far as a machine without a GPU can check it: the refusal and the report lines."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from gpu_check import result_line  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_fails():
    done = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout.strip().splitlines() == [
        "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); run it where there is one"]


def test_report_lines():
    gpt = {"tokens_per_second": 400_000.0, "val_loss": 1.2345}
    line = result_line("notebook_gpt", gpt, flops_per_token=6e7, peak_flops=989e12, peak_memory=3 * 2**30)
    assert line == "notebook_gpt: 400,000 tokens/s, MFU 2.4%, val 1.234, peak GPU memory 3.0 GiB"
    dcgan = {"images_per_second": 5123.4, "loss_d": 0.5}
    assert result_line("notebook_dcgan", dcgan, None, None, 2**29) == \
        "notebook_dcgan: 5,123 images/s, peak GPU memory 0.5 GiB"
