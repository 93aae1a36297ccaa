"""Data parallelism on CPU (gloo, 2 processes under torchrun): same result as 1 process with the same global
batch, exact stop + resume, and a dead rank makes the other exit non-zero in bounded time. Expert
parallelism through the same command: training equals DDP's, exact stop + resume, resume across EP sizes,
and with FSDP2."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
from train_helpers import make_tiny_data, tiny_configs

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.train.monitor import read_metrics
from deepseek_lm.train.session import train

pytestmark = pytest.mark.slow

# 2 ranks × micro-batch 2 = 1 rank × micro-batch 4: the loader gives the same global batches either way.
# With an MTP module: its loss, top-1 counts and router statistics travel in the step's all-reduce too.
COMMON = [
    "--preset", "tiny", "--max-steps", "6", "--train.grad_accum_steps", "2", "--train.peak_flops", "1e12",
    "--train.eval_every", "0", "--train.sample_every", "0", "--train.log_every", "1",
    "--model.num_nextn_predict_layers", "1",
]  # fmt: skip
# fp32 gradient all-reduce sums in another order than one process's batch mean: parameters agree to ~1e-6
# after 6 AdamW steps at lr 3e-3; the tolerance leaves an order of magnitude of headroom.
ATOL, RTOL = 1e-5, 1e-4
TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(data_dir, out, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "deepseek_lm", "train", *COMMON, "--train.micro_batch_size", "2",
        "--data-dir", str(data_dir), "--out", str(out), *args,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=timeout)
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr:
        # A rank used to abort in the C++ teardown at interpreter exit after a finished run (every checkpoint
        # written); the CLI now leaves torchrun jobs with os._exit. Should it come back it is reported, not
        # hidden: the callers' checks of checkpoints, losses and output still decide.
        warnings.warn(f"a rank aborted at exit after the run: {TEARDOWN_ABORT!r}", stacklevel=2)
        return proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(data_dir, out)
    assert "2 process(es) · DDP" in proc.stdout
    assert "global batch 2 × 2 accumulation × 2 process(es) = 8 sequences" in proc.stdout
    return out


def test_two_processes_match_one_with_the_same_global_batch(data_dir, ddp_run, tmp_path):
    model_config, cfg = tiny_configs(
        data_dir, max_steps=6, grad_accum_steps=2, micro_batch_size=4, eval_every=0, sample_every=0
    )
    model_config.num_nextn_predict_layers = 1
    single = train(model_config, cfg, tmp_path)
    a = ckpt.read_model_state(single.checkpoint)
    b = ckpt.read_model_state(ckpt.latest_checkpoint(ddp_run))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=RTOL, msg=name)
    biases = [k for k in a if k.endswith("e_score_correction_bias")]
    assert all(torch.equal(a[k], b[k]) for k in biases)  # from identical all-reduced integer counts
    one, two = losses(tmp_path), losses(ddp_run)
    assert one.keys() == two.keys() == set(range(1, 7))
    assert all(abs(one[s] - two[s]) < 1e-4 for s in one)


@pytest.fixture(scope="module")
def ddp_at_step_3(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp3")
    torchrun(data_dir, out, "--stop-at-step", "3")
    assert ckpt.latest_checkpoint(out, training=True).name == "step_00000003"
    return out


def copy_run(run_dir, tmp_path):
    """A copy to resume (the fixtures' runs are shared); the `latest` link is relative, so it follows."""
    return shutil.copytree(run_dir, tmp_path / "run", symlinks=True)


def assert_close_states(a_dir, b_dir) -> None:
    a = ckpt.read_model_state(ckpt.latest_checkpoint(a_dir))
    b = ckpt.read_model_state(ckpt.latest_checkpoint(b_dir))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=RTOL, msg=name)
    assert all(abs(losses(a_dir)[s] - losses(b_dir)[s]) < 1e-4 for s in range(1, 7))


def test_two_process_stop_and_resume_equals_uninterrupted(data_dir, ddp_run, ddp_at_step_3, tmp_path):
    run = copy_run(ddp_at_step_3, tmp_path)
    proc = torchrun(data_dir, run, "--resume")
    assert "resumed from" in proc.stdout
    a = ckpt.read_model_state(ckpt.latest_checkpoint(ddp_run))
    b = ckpt.read_model_state(ckpt.latest_checkpoint(run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(ddp_run) == losses(run)


def launched(data_dir, out, *args: str, **popen) -> subprocess.Popen:
    """`deepseek-lm train --train.cpu_processes 2` started as a user would, no torchrun in sight."""
    argv = [
        sys.executable, "-m", "deepseek_lm", "train", *COMMON, "--train.micro_batch_size", "2",
        "--data-dir", str(data_dir), "--out", str(out), "--train.cpu_processes", "2", *args,
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_cpu_processes_launch_the_run_torchrun_would(data_dir, ddp_run, tmp_path):
    proc = launched(data_dir, tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("\nrun ") + out.startswith("run ") == 1  # one process prints
    assert "2 process(es) · DDP" in out and "finished at step 6/6" in out
    assert "Warning" not in err and "W1" not in err  # nor torchrun's agent, nor DDP's deprecation
    assert losses(tmp_path) == losses(ddp_run)  # the same processes, the same arithmetic


def test_ctrl_c_stops_the_launched_processes_like_one(data_dir, tmp_path):
    """torchrun puts each process in a session of its own: the launcher passes the terminal's SIGINT on."""
    proc = launched(data_dir, tmp_path, "--max-steps", "100000")
    deadline = time.monotonic() + 300
    while len(read_metrics(tmp_path, "train")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # to the launcher alone, as a terminal's Ctrl-C reaches it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("SIGINT: finishing the current step") == 1 and "stopped by a signal" in out
    last_logged = max(r["step"] for r in read_metrics(tmp_path, "train"))
    assert ckpt.latest_checkpoint(tmp_path, training=True).name == f"step_{last_logged:08d}"


def test_a_failed_launched_process_ends_in_one_line(tmp_path):
    proc = launched(tmp_path / "no-such-data", tmp_path / "run")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "not a prepared data directory" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "deepseek-lm train: error: training process 0 of 2 failed (exit code 2); its error is above"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_makes_the_other_exit_nonzero_in_bounded_time(data_dir, tmp_path):
    # Two ranks started by hand (as torchrun would), so that killing one leaves the other to our code alone.
    port = free_port()
    argv = [
        sys.executable, "-m", "deepseek_lm", "train", *COMMON, "--max-steps", "100000",
        "--train.micro_batch_size", "2", "--train.save_every", "2", "--train.dist_timeout_s", "60",
        "--data-dir", str(data_dir), "--out", str(tmp_path),
    ]  # fmt: skip
    procs = []
    for rank in range(2):
        rank_env = {**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                    "RANK": str(rank), "LOCAL_RANK": str(rank)}  # fmt: skip
        procs.append(
            subprocess.Popen(argv, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    try:
        deadline = time.monotonic() + 300
        while len(read_metrics(tmp_path, "train")) < 4:
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        # bounded: the dead peer's closed connection, or at worst the 60 s collective timeout
        _, err = procs[0].communicate(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode not in (0, None)
    assert "lost contact with the other processes" in err and "--resume" in err

    # and the run resumes from its last complete checkpoint (here in one process with the same global batch)
    step = ckpt.read_trainer_state(ckpt.latest_checkpoint(tmp_path, training=True))["state"]["step"]
    resume = ["--resume", "--stop-at-step", str(step + 1), "--train.micro_batch_size", "4"]
    proc = subprocess.run(
        [*argv[:3], "train", "--out", str(tmp_path), *resume],
        capture_output=True, text=True, env=env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt.latest_checkpoint(tmp_path, training=True).name == f"step_{step + 1:08d}"


def test_fsdp2_stop_and_resume_matches_ddp(data_dir, ddp_run, tmp_path):
    # FSDP2 is meant for GPUs; over gloo on CPU it runs the same sharded code path: gathering full state
    # dicts into our one-directory checkpoint, and restoring the sharded optimizer from it on resume.
    torchrun(data_dir, tmp_path, "--train.fsdp", "true", "--stop-at-step", "3")
    proc = torchrun(data_dir, tmp_path, "--train.fsdp", "true", "--resume")
    assert "FSDP2" in proc.stdout and "resumed from" in proc.stdout
    assert_close_states(ddp_run, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# expert parallelism: 2 processes share the tiny preset's 4 routed experts, 2 each

EP2 = ["--train.expert_parallel", "2"]


@pytest.fixture(scope="module")
def ep_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    proc = torchrun(data_dir, out, *EP2)
    assert "DDP · expert parallel 2 (2 of 4 routed experts per process)" in proc.stdout
    return out


@pytest.fixture(scope="module")
def ep_at_step_3(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep3")
    torchrun(data_dir, out, *EP2, "--stop-at-step", "3")
    return out


def test_expert_parallel_training_matches_ddp(ddp_run, ep_run):
    assert_close_states(ddp_run, ep_run)  # the checkpoint holds the whole expert set, under the same names
    a = ckpt.read_model_state(ckpt.latest_checkpoint(ddp_run))
    b = ckpt.read_model_state(ckpt.latest_checkpoint(ep_run))
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("e_score_correction_bias"))
    saved = ckpt.read_trainer_state(ckpt.latest_checkpoint(ep_run))["optimizer"]["state"]
    assert {v["exp_avg"].shape[0] for v in saved.values() if v["exp_avg"].ndim == 3} == {4}  # full moments


def test_expert_parallel_stop_and_resume_equals_uninterrupted(data_dir, ep_run, ep_at_step_3, tmp_path):
    run = copy_run(ep_at_step_3, tmp_path)
    assert "resumed from" in torchrun(data_dir, run, "--resume").stdout  # EP 2 from the run's config
    a = ckpt.read_model_state(ckpt.latest_checkpoint(ep_run))
    b = ckpt.read_model_state(ckpt.latest_checkpoint(run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # router biases included
    assert losses(ep_run) == losses(run)


@pytest.mark.parametrize("direction", ["ep-to-ddp", "ddp-to-ep"])
def test_resume_across_expert_parallelism(
    data_dir, ddp_run, ep_at_step_3, ddp_at_step_3, direction, tmp_path
):
    # the checkpoint holds the whole expert set and full AdamW moments: each process takes its slice or all
    start, ep = (ep_at_step_3, "1") if direction == "ep-to-ddp" else (ddp_at_step_3, "2")
    run = copy_run(start, tmp_path)
    proc = torchrun(data_dir, run, "--resume", "--train.expert_parallel", ep)
    assert ("expert parallel" in proc.stdout) == (ep == "2")
    assert_close_states(ddp_run, run)


def test_fsdp2_with_expert_parallelism_stop_and_resume_matches_ddp(data_dir, ddp_run, tmp_path):
    # experts sharded by EP, then by FSDP2 over their replicas (none here); checkpoints gathered from both
    torchrun(data_dir, tmp_path, "--train.fsdp", "true", *EP2, "--stop-at-step", "3")
    proc = torchrun(data_dir, tmp_path, "--resume")
    assert "FSDP2 · expert parallel 2" in proc.stdout
    assert_close_states(ddp_run, tmp_path)


def test_fsdp2_with_muon_stop_and_resume_equals_uninterrupted(data_dir, tmp_path):
    # Muon under FSDP2: torch's Muon steps the sharded 2-D matrices through DTensor operations, ExpertMuon
    # the whole experts each rank holds, and the combined optimizer's state goes through DCP's full state
    # dicts into the checkpoint and back into the shards on resume
    muon = ["--train.fsdp", "true", "--train.optimizer", "muon"]
    torchrun(data_dir, tmp_path / "straight", *muon)
    torchrun(data_dir, tmp_path / "resumed", *muon, "--stop-at-step", "3")
    proc = torchrun(data_dir, tmp_path / "resumed", *muon, "--resume")
    assert "FSDP2" in proc.stdout and "Muon lr 0.003" in proc.stdout
    a, b = (ckpt.read_model_state(ckpt.latest_checkpoint(tmp_path / d)) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
