"""Monitoring and plots: metrics.jsonl, W&B offline without network, valid PNG plots."""

import json
import time

import numpy as np
import pytest

from deepseek_lm.train.monitor import Monitor, _flatten, init_wandb, read_metrics, truncate_metrics
from deepseek_lm.train.plots import expert_load_from_metrics, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(n_steps: int) -> list[dict]:
    out = []
    for step in range(1, n_steps + 1):
        load = [[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]
        out.append({"kind": "train", "step": step, "loss": 5.0 / step, "bits_per_byte": 3.0 / step,
                    "lr": 1e-3 * step, "expert_load": load})  # fmt: skip
        if step % 2 == 0:
            out.append({"kind": "eval", "step": step, "loss": 5.5 / step, "bits_per_byte": 3.3 / step})
    return out


def _eventually(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _write(run_dir, records):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_truncate_metrics_drops_later_steps(tmp_path):
    _write(tmp_path, _records(6))
    truncate_metrics(tmp_path, 4)
    assert max(r["step"] for r in read_metrics(tmp_path)) == 4
    assert [r["step"] for r in read_metrics(tmp_path, "eval")] == [2, 4]


def test_plots_are_valid_pngs(tmp_path):
    _write(tmp_path, _records(6))
    paths = plot_run(tmp_path, baselines={"xz -9": 2.0, "zpaq -m5": 1.5})
    assert sorted(p.name for p in paths) == ["expert_load.png", "loss.png", "lr.png"]
    import matplotlib.image

    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(path).ndim == 3  # decodes as an image


def test_expert_load_is_the_mean_share(tmp_path):
    _write(tmp_path, _records(3))
    load = expert_load_from_metrics(tmp_path)
    assert load.shape == (2, 4) and np.allclose(load.sum(axis=1), 1.0)


def test_flatten_for_wandb():
    flat = _flatten(
        {"kind": "train", "step": 3, "loss": 2.0, "expert_load": [[0.5, 0.5]], "x": float("nan")}, "train"
    )
    assert flat == {"train/loss": 2.0, "train/expert_load/0/0": 0.5, "train/expert_load/0/1": 0.5}


def test_wandb_offline_writes_its_run_dir_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = init_wandb("deepseek-lm-test", "online", tmp_path, {"lr": 1e-3}, None, "testrun1")
    monitor = Monitor(tmp_path, total_steps=3, start_step=0, bar=False, wandb_run=run)
    for record in _records(3):
        monitor.log(record)
    monitor.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*-testrun1/run-testrun1.wandb")
    # wandb's separate core process finishes writing the file shortly after finish() returns
    assert _eventually(
        lambda: b"train/loss" in run_file.read_bytes() and b"eval/bits_per_byte" in run_file.read_bytes()
    )
    assert len(read_metrics(tmp_path, "train")) == 3  # metrics.jsonl is written regardless


def test_online_without_api_key_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="offline"):
        run = init_wandb("deepseek-lm-test", "online", tmp_path, {}, None, "testrun2")
    run.finish()
    assert list(tmp_path.glob("wandb/offline-run-*-testrun2"))


def test_mtp_figures_in_the_log_line_wandb_names_and_the_loss_plot(tmp_path):
    import matplotlib.image

    from deepseek_lm.train.monitor import format_eval, format_train

    records = _records(4)
    for r in records:  # one MTP depth: its loss and its drafts' top-1 agreement, in train and eval records
        r |= {"mtp_loss": [1.1 * r["loss"]], "mtp_top1": [0.3 + 0.01 * r["step"]]}
    train = records[0] | {"tokens_per_s": 1000.0}
    assert "mtp loss 5.500 top-1 31.0%" in format_train(train, total_steps=4)
    evaluation = records[2] | {"perplexity": 10.0}
    assert format_eval(evaluation, {}, 2).endswith("mtp loss 3.025 top-1 32.0%")
    line = format_eval(evaluation, {"xz -9": 1.9371, "zpaq -m5": 1.5109}, 2)
    assert "bits/byte (xz -9: 1.937, zpaq -m5: 1.511) | mtp loss" in line
    assert {"train/mtp_loss/0", "train/mtp_top1/0"} <= set(_flatten(records[0], "train"))
    _write(tmp_path, records)
    plot_run(tmp_path, baselines={"xz -9": 2.0, "zpaq -m5": 1.5})
    height = matplotlib.image.imread(tmp_path / "loss.png").shape[0]
    _write(tmp_path, _records(4))
    plot_run(tmp_path, baselines={"xz -9": 2.0, "zpaq -m5": 1.5})
    assert height > 1.5 * matplotlib.image.imread(tmp_path / "loss.png").shape[0]  # the top-1 panel below
