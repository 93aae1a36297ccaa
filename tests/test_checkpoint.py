"""Checkpoint IO: atomic writes, run-directory resolution, pruning, one-line errors naming the file."""

import json

import pytest
import torch
from torch import nn

from deepseek_lm import checkpoint as ckpt
from deepseek_lm.checkpoint import CheckpointError
from deepseek_lm.config import DeepSeekConfig


class StandIn(nn.Module):
    """A few tensors named like the model's, a buffer among them (the MoE bias); not the real model."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("bias", torch.randn(config.n_routed_experts))


class Evil:
    """An arbitrary class: weights_only loading must refuse to unpickle it."""


@pytest.fixture
def model(tiny_config):
    return StandIn(tiny_config)


def _state(step: int) -> dict:
    return {"step": step, "rng": torch.get_rng_state(), "loader": {"epoch": 1, "position": 7}}


def test_write_and_read_round_trip(tmp_path, model, tiny_config):
    out = ckpt.save_model_dir(tmp_path / "m", model, train_config={"lr": 1e-3})
    assert ckpt.is_checkpoint_dir(out)
    state = ckpt.read_model_state(out)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    config, train = ckpt.read_config_json(out)
    assert config == tiny_config and train == {"lr": 1e-3}
    doc = json.loads((out / "config.json").read_text())
    assert doc["format"] == "deepseek-lm" and doc["version"] == 1
    assert not list(tmp_path.glob(".tmp-*"))


def test_tied_head_is_stored_once_and_reloads(tmp_path, tiny_config):
    config = DeepSeekConfig.from_preset("tiny", tie_word_embeddings=True)
    model = StandIn(config)
    out = ckpt.save_model_dir(tmp_path / "m", model)
    state = ckpt.read_model_state(out)
    assert "lm_head.weight" not in state
    fresh = StandIn(config)
    ckpt.load_model_weights(fresh, state, config, out / "model.safetensors")
    assert torch.equal(fresh.lm_head.weight, model.embed_tokens.weight)


def test_trainer_state_loads_with_weights_only(tmp_path, model, tiny_config):
    path = ckpt.save_training_checkpoint(tmp_path, 3, model.state_dict(), tiny_config, _state(3))
    state = ckpt.read_trainer_state(path)
    assert state["step"] == 3 and state["loader"] == {"epoch": 1, "position": 7}
    assert torch.equal(state["rng"], torch.get_rng_state())


def test_trainer_state_with_a_pickled_object_is_refused(tmp_path, model, tiny_config):
    path = ckpt.save_training_checkpoint(tmp_path, 1, model.state_dict(), tiny_config, {"x": Evil()})
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt"):
        ckpt.read_trainer_state(path)


def test_run_dir_resolves_to_best_else_latest_and_prunes(tmp_path, model, tiny_config):
    sd = model.state_dict()
    ckpt.save_training_checkpoint(tmp_path, 1, sd, tiny_config, _state(1), keep_last=2)
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_00000001"  # no best yet: latest
    ckpt.save_training_checkpoint(tmp_path, 2, sd, tiny_config, _state(2), is_best=True, keep_last=2)
    for step in (3, 4, 5):
        ckpt.save_training_checkpoint(tmp_path, step, sd, tiny_config, _state(step), keep_last=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000002", "step_00000004", "step_00000005"]  # the best survives pruning
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_00000002"
    assert ckpt.latest_checkpoint(tmp_path, training=True).name == "step_00000005"
    assert (tmp_path / "latest").resolve().name == "step_00000005"


def test_failure_inside_save_leaves_previous_checkpoint(tmp_path, model, tiny_config, monkeypatch):
    sd = model.state_dict()
    first = ckpt.save_training_checkpoint(tmp_path, 1, sd, tiny_config, _state(1))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        ckpt.save_training_checkpoint(tmp_path, 2, sd, tiny_config, _state(2))
    assert ckpt.latest_checkpoint(tmp_path, training=True) == first
    assert ckpt.read_trainer_state(first)["step"] == 1
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_overwriting_a_checkpoint_dir_is_atomic(tmp_path, model, tiny_config):
    out = ckpt.save_model_dir(tmp_path / "m", model)
    model.bias.add_(1.0)
    ckpt.save_model_dir(tmp_path / "m", model)
    assert torch.equal(ckpt.read_model_state(out)["bias"], model.bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


READERS = {
    "model.safetensors": ckpt.read_model_state,
    "trainer_state.pt": ckpt.read_trainer_state,
    "config.json": ckpt.read_config_json,
}


@pytest.mark.parametrize("name", READERS)
def test_corrupt_file_is_one_line_naming_it_and_the_way_out(tmp_path, model, tiny_config, name):
    path = ckpt.save_training_checkpoint(tmp_path, 1, model.state_dict(), tiny_config, _state(1))
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        READERS[name](path)
    message = str(info.value)
    assert name in message and "\n" not in message
    assert message.endswith(
        "load another checkpoint (a run directory keeps its latest few and its best) or save this one again"
    )


def test_mismatched_shapes_name_the_tensor(tmp_path, model):
    out = ckpt.save_model_dir(tmp_path / "m", model)
    other = DeepSeekConfig.from_preset("tiny", hidden_size=48)
    with pytest.raises(CheckpointError, match=r"embed_tokens\.weight") as info:
        ckpt.load_model_weights(StandIn(other), ckpt.read_model_state(out), other, out / "model.safetensors")
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)


def test_foreign_config_json_is_refused(tmp_path, model):
    out = ckpt.save_model_dir(tmp_path / "m", model)
    (out / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    with pytest.raises(CheckpointError, match="deepseek-lm import"):
        ckpt.read_config_json(out)


def test_weights_are_readable_as_the_other_files(tmp_path, model):
    """safetensors creates its files owner-only; a shared run or export directory needs them as the rest."""
    out = ckpt.save_model_dir(tmp_path / "m", model)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
