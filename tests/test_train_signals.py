"""SIGINT / SIGTERM in the middle of `deepseek-lm train` (a real subprocess): finish the step, save, exit 0."""

import os
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import make_tiny_data

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.checkpoint import load_checkpoint
from deepseek_lm.train.monitor import read_metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def wait_for(condition, proc, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_the_last_finished_step_and_exits_zero(data_dir, tmp_path, sig):
    run_dir = tmp_path / "run"
    argv = [
        sys.executable, "-m", "deepseek_lm", "train", "--preset", "tiny", "--data-dir", str(data_dir),
        "--out", str(run_dir), "--max-steps", "100000", "--train.log_every", "1", "--train.eval_every", "0",
        "--train.save_every", "0", "--train.sample_every", "0", "--train.peak_flops", "1e12",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(lambda: len(read_metrics(run_dir, "train")) >= 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "saving a checkpoint" in out and "stopped by a signal" in out

    last_logged = max(r["step"] for r in read_metrics(run_dir, "train"))
    latest = ckpt.latest_checkpoint(run_dir, training=True)
    assert ckpt.read_trainer_state(latest)["state"]["step"] == last_logged
    assert latest.name == f"step_{last_logged:08d}"
    assert not load_checkpoint(run_dir).model.training
