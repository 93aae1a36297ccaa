"""Training end to end on the tiny preset: exact resume, interrupted checkpoint writes, non-finite steps,
outputs of a run (checkpoints, plots, W&B offline), corrupt checkpoints."""

import itertools
import shutil
from dataclasses import replace

import pytest
import torch
from train_helpers import make_tiny_data, tiny_configs

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.checkpoint import CheckpointError, load_checkpoint
from deepseek_lm.errors import UserError
from deepseek_lm.train import loop
from deepseek_lm.train.monitor import read_metrics
from deepseek_lm.train.session import TrainingDiverged, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


# ---------------------------------------------------------------------------------------------------------
# one full run, shared by the tests that only look at its outputs


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(run_dir), "WANDB_SILENT": "true"}.items():
        mp.setenv(key, value)
    mp.delenv("WANDB_API_KEY", raising=False)
    model_config, cfg = tiny_configs(data_dir, max_steps=8, eval_every=4, save_every=4, wandb_project="t")
    result = train(model_config, cfg, run_dir)
    mp.undo()
    return result


def test_run_writes_checkpoints_metrics_and_plots(full_run):
    run_dir = full_run.run_dir
    assert full_run.reason == "done" and full_run.step == 8
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000004", "step_00000008"]
    for name in ["loss.png", "lr.png", "expert_load.png"]:
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC
    records = read_metrics(run_dir, "train")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert {"expert_load", "dropped_frac", "router_entropy", "mfu", "rss_gb", "cpu_percent"} <= set(
        records[-1]
    )
    evals = read_metrics(run_dir, "eval")
    assert [r["step"] for r in evals] == [4, 8] and evals[-1]["full"]
    assert evals[0]["selection_loss"] == evals[0]["loss"]  # periodic: exactly the selection batches
    assert evals[-1]["tokens"] > evals[0]["tokens"]  # final: the whole split
    assert read_metrics(run_dir, "sample")[-1]["texts"]
    assert full_run.val["bits_per_byte"] == evals[-1]["bits_per_byte"]


def test_checkpoint_loads_with_config_and_tokenizer(full_run):
    loaded = load_checkpoint(full_run.run_dir)
    assert loaded.path == ckpt.resolve_checkpoint(full_run.run_dir)
    assert loaded.train_config["max_steps"] == 8 and loaded.tokenizer is not None
    assert loaded.config.vocab_size % 64 == 0 and not loaded.model.training
    state = ckpt.read_trainer_state(full_run.checkpoint)
    assert state["state"]["step"] == 8 and state["loader"]["batch"] > 0


def test_wandb_offline_run_dir_holds_the_metrics(full_run):
    (run_file,) = full_run.run_dir.glob("wandb/offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0  # the metric names are checked in test_train_monitor


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt"])
def test_corrupt_checkpoint_file_is_one_line(full_run, tmp_path, name):
    copy = tmp_path / "ckpt"
    shutil.copytree(full_run.checkpoint, copy)
    (copy / name).write_bytes((copy / name).read_bytes()[:100])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(copy) if name == "model.safetensors" else ckpt.read_trainer_state(copy)
    assert str(copy / name) in str(info.value) and "\n" not in str(info.value)


def test_mismatched_checkpoint_names_the_file(full_run, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(full_run.checkpoint, copy)
    text = (copy / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 32')
    (copy / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"model\.safetensors") as info:
        load_checkpoint(copy)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize(
    "mtp, optimizer", [(0, "adamw"), (1, "adamw"), (1, "muon")], ids=["plain", "mtp", "muon-mtp"]
)
def test_resume_is_exact(data_dir, tmp_path, mtp, optimizer):
    # with MTP: its module's weights and router bias, and λ's switch to its final value (at step 4) across
    # the resume; with Muon: the combined optimizer's momenta (AdamW, Muon, the experts' batched Muon)
    model_config, cfg = tiny_configs(data_dir, max_steps=8, eval_every=0, save_every=0, sample_every=0,
                                     mtp_weight_final=0.1, mtp_weight_switch=0.5, optimizer=optimizer)  # fmt: skip
    model_config.num_nextn_predict_layers = mtp
    straight = train(model_config, cfg, tmp_path / "straight")

    first = train(model_config, cfg, tmp_path / "resumed", stop_at_step=4)
    assert (first.reason, first.step) == ("paused", 4)
    resumed = train(model_config, cfg, tmp_path / "resumed", resume=True)
    assert resumed.step == 8

    a = ckpt.read_model_state(straight.checkpoint)
    b = ckpt.read_model_state(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    biases = [k for k in a if k.endswith("e_score_correction_bias")]
    assert biases and any(a[k].abs().sum() > 0 for k in biases)  # the biases moved, and identically
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "resumed")
    sa, sb = ckpt.read_trainer_state(straight.checkpoint), ckpt.read_trainer_state(resumed.checkpoint)
    assert sa["loader"] == sb["loader"] and sa["scheduler"] == sb["scheduler"]
    if mtp:
        assert any(k.startswith("mtp.0.mlp.gate.e_score") for k in biases)
        records = read_metrics(tmp_path / "resumed", "train")
        assert [r["mtp_weight"] for r in records] == [0.3] * 4 + [0.1] * 4
        mtp_logged = [(r["mtp_loss"], r["mtp_top1"]) for r in records]
        assert mtp_logged == [
            (r["mtp_loss"], r["mtp_top1"]) for r in read_metrics(tmp_path / "straight", "train")
        ]


def test_resume_with_another_optimizer_is_one_line(data_dir, tmp_path):
    model_config, cfg = tiny_configs(data_dir, max_steps=4, eval_every=0, save_every=0, sample_every=0)
    train(model_config, cfg, tmp_path, stop_at_step=2)
    with pytest.raises(UserError, match=r"does not fit train\.optimizer muon") as info:
        train(model_config, replace(cfg, optimizer="muon"), tmp_path, resume=True)
    assert "\n" not in str(info.value)


def test_interrupted_checkpoint_write_keeps_the_previous_one(data_dir, tmp_path, monkeypatch):
    model_config, cfg = tiny_configs(data_dir, max_steps=8, eval_every=0, save_every=4, sample_every=0)
    real_save = torch.save

    def dies_at_step_8(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if obj["state"]["step"] == 8:
            with open(path, "r+b") as f:  # a half-written file, then the failure
                f.truncate(64)
            raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ckpt.torch, "save", dies_at_step_8)
        with pytest.raises(CheckpointError, match="No space left"):
            train(model_config, cfg, tmp_path)
    latest = ckpt.latest_checkpoint(tmp_path, training=True)
    assert latest.name == "step_00000004" and ckpt.read_trainer_state(latest)["state"]["step"] == 4
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    load_checkpoint(tmp_path)
    resumed = train(model_config, cfg, tmp_path, resume=True)
    assert resumed.step == 8 and resumed.checkpoint.name == "step_00000008"


def test_new_run_refuses_a_directory_with_checkpoints(full_run):

    model_config, cfg = tiny_configs(full_run.run_dir, max_steps=2)
    cfg.data_dir = str(load_checkpoint(full_run.run_dir).train_config["data_dir"])
    with pytest.raises(UserError, match="--resume"):
        train(model_config, cfg, full_run.run_dir)


# ---------------------------------------------------------------------------------------------------------
# non-finite losses


def poison_losses_after(monkeypatch, step: int) -> None:
    original = loop.forward_backward

    def forward_backward(t, x, y, sync):
        out = original(t, x, y, sync)
        if t.state.step >= step:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "forward_backward", forward_backward)


def test_nonfinite_steps_are_skipped_then_the_run_saves_and_stops(data_dir, tmp_path, monkeypatch):
    model_config, cfg = tiny_configs(data_dir, max_steps=8, eval_every=0, save_every=0, sample_every=0)
    poison_losses_after(monkeypatch, 2)
    with pytest.warns(RuntimeWarning, match="non-finite") as warned, pytest.raises(TrainingDiverged) as info:
        train(model_config, cfg, tmp_path)
    assert len([w for w in warned if "non-finite" in str(w.message)]) == 3
    assert "3 steps in a row" in str(info.value) and "\n" not in str(info.value)
    latest = ckpt.latest_checkpoint(tmp_path, training=True)
    assert latest.name == "step_00000002"
    assert all(torch.isfinite(v).all() for v in ckpt.read_model_state(latest).values())


# ---------------------------------------------------------------------------------------------------------
# the time-budget schedule


class FakeTime:
    """The loop's clock, advancing one second per reading: the budget runs out after a known step count."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 1.0
        return self.now

    perf_counter = staticmethod(__import__("time").perf_counter)


def test_schedule_by_time_decays_to_the_floor_as_the_budget_ends(data_dir, tmp_path, monkeypatch):
    model_config, cfg = tiny_configs(
        data_dir, max_steps=10_000, max_time_minutes=1.0, schedule_by_time=True, eval_every=0, save_every=0
    )
    monkeypatch.setattr(loop, "time", FakeTime())
    result = train(model_config, cfg, tmp_path)
    assert result.reason == "done" and 10 < result.step < 40  # ~2 fake seconds per step, 45 s usable
    lrs = [r["lr"] for r in read_metrics(tmp_path, "train")]
    peak = lrs.index(max(lrs))  # the warmup ramps up while the clock already decays
    assert peak < cfg.warmup_steps and max(lrs) <= cfg.lr
    assert all(a < b for a, b in itertools.pairwise(lrs[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[peak:]))
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert ckpt.read_trainer_state(result.checkpoint)["state"]["train_seconds"] > 0


def test_the_budget_reserves_the_final_evaluation_at_each_processs_pace():
    """Every process scores the whole validation split: with 2 processes each one's share of a step's
    tokens is half, so its final evaluation takes twice the steps' worth of time one process would."""
    from types import SimpleNamespace

    from deepseek_lm.train.budget import FINISH_RESERVE_S, TimeBudget

    def budget(world_size):
        t = SimpleNamespace(
            state=SimpleNamespace(train_seconds=0.0), cfg=SimpleNamespace(max_time_minutes=10.0),
            data=SimpleNamespace(manifest={"splits": {"val": {"tokens": 30_000}}}), tokens_per_step=1_000,
            dist=SimpleNamespace(world_size=world_size),
        )  # fmt: skip
        b = TimeBudget(t)
        t.state.train_seconds, b.steps = 100.0, 100  # 1 s per step
        return 100.0 / b.progress()  # the usable seconds

    assert budget(1) == pytest.approx(600 - 30_000 / 1_000 / 3 - FINISH_RESERVE_S)
    assert budget(2) == pytest.approx(600 - 30_000 / 500 / 3 - FINISH_RESERVE_S)


def test_a_slow_first_step_does_not_use_the_budget_up():
    """A first step that compiles (a minute) beside 0.1 s steps: the final evaluation's reserve follows the
    typical step, so the run goes on past its second step (it stopped there, the mean step then being 30 s)."""
    from types import SimpleNamespace

    from deepseek_lm.train.budget import TimeBudget

    t = SimpleNamespace(
        state=SimpleNamespace(train_seconds=0.0), cfg=SimpleNamespace(max_time_minutes=7.0),
        data=SimpleNamespace(manifest={"splits": {"val": {"tokens": 60_000}}}), tokens_per_step=1_000,
        dist=SimpleNamespace(world_size=1),
    )  # fmt: skip
    b = TimeBudget(t)
    progress = []
    for duration in [60.0] + [0.1] * 30:
        b.record_step()  # what set_lr does before each step
        progress.append(b.progress())
        b.steps += 1
        t.state.train_seconds += duration  # the step
    assert max(progress) < 0.2
    b.record_step()
    assert b.progress() == pytest.approx(63.0 / (420 - 60_000 / 1_000 / 3 * 0.1 - 15), rel=1e-6)


def test_bf16_autocast_trains_on_cpu(data_dir, tmp_path):
    model_config, cfg = tiny_configs(data_dir, max_steps=2, precision="bf16", eval_every=0, sample_every=0)
    result = train(model_config, cfg, tmp_path)
    assert result.step == 2 and result.val["loss"] < 10


def test_gradient_checkpointing_gives_the_same_training(data_dir, tmp_path):
    runs = []
    for flag in (False, True):
        model_config, cfg = tiny_configs(
            data_dir, max_steps=3, gradient_checkpointing=flag, eval_every=0, sample_every=0
        )
        runs.append(ckpt.read_model_state(train(model_config, cfg, tmp_path / str(flag)).checkpoint))
    plain, recomputed = runs
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5)
