"""Checkpoints: one directory per checkpoint, written atomically, loaded without unpickling code (SPEC §7).

A checkpoint directory holds
    model.safetensors   the model's state_dict, MoE router biases included (a tied head is stored once)
    config.json         {"format": "deepseek-lm", "version": 1, "model": {...}, "train": {...} | null}
    tokenizer.json      the tokenizer the model was trained with (when known)
    chat_template.jinja the model's chat template (when it has one; data/chat.py), transformers' file name
    trainer_state.pt    training checkpoints only: optimizer, scheduler, scaler, RNG and loader states, step,
                        best validation loss; plain tensors and containers, read with weights_only=True

A run directory (what `train --out` writes) holds `checkpoints/step_XXXXXXXX/` directories plus two relative
symlinks, `latest` and `best`, each replaced atomically. `resolve_checkpoint(run_dir)` gives the best, else
the latest complete checkpoint. Every directory is first written as a hidden sibling `.tmp-*` and renamed
into place, so a crash mid-write leaves the previous checkpoint untouched and no half-written `step_*`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError

FORMAT = "deepseek-lm"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TRAINER_STATE_FILE = "trainer_state.pt"
CHECKPOINTS_DIR = "checkpoints"
STEP_DIR_RE = re.compile(r"^step_(\d+)$")
TIED_HEAD_KEY = "lm_head.weight"


class CheckpointError(UserError):
    """A missing, corrupt or mismatched checkpoint; the message names the file."""


@dataclass
class Checkpoint:
    model: torch.nn.Module  # in eval mode
    config: DeepSeekConfig
    tokenizer: Any  # tokenizers.Tokenizer, or None when the directory has no tokenizer.json
    train_config: dict[str, Any] | None
    path: Path
    chat_template: str | None = None  # chat_template.jinja, when the checkpoint has one


# ---------------------------------------------------------------------------------------------------------
# resolution


def is_checkpoint_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file()


def step_of(path: Path) -> int | None:
    match = STEP_DIR_RE.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete `step_*` checkpoints of a run directory, oldest first."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if step_of(p) is not None and is_checkpoint_dir(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: str | Path, *, training: bool = False) -> Path | None:
    """The newest complete checkpoint of a run (with `training`, one that also has a trainer_state.pt)."""
    found = list_checkpoints(run_dir)
    if training:
        found = [p for p in found if (p / TRAINER_STATE_FILE).is_file()]
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or for a run directory its best checkpoint, else its latest."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return path
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    best = path / "best"
    if best.is_dir() and is_checkpoint_dir(best):
        return best.resolve()
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise CheckpointError(
        f"{path} is neither a checkpoint directory (no {MODEL_FILE} + {CONFIG_FILE}) nor a run directory "
        f"with a complete checkpoint under {CHECKPOINTS_DIR}/"
    )


# ---------------------------------------------------------------------------------------------------------
# atomic directory writes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; durability is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a complete `tmp` into `final`; an existing `final` is moved aside first and removed last."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _symlink_atomic(link: Path, target: str) -> None:
    tmp = link.with_name(f".tmp-{link.name}-{uuid.uuid4().hex[:8]}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


# ---------------------------------------------------------------------------------------------------------
# writing


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """A safetensors file readable as the other files are: safetensors creates it owner-only (0600)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata={"format": "pt"})  # transformers reads "pt" as PyTorch
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _tensors_to_save(
    state_dict: Mapping[str, torch.Tensor], config: DeepSeekConfig
) -> dict[str, torch.Tensor]:
    # safetensors refuses aliased tensors: a tied head shares the embedding's storage, so store it once.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop(TIED_HEAD_KEY, None)
    return tensors


def _config_json(config: DeepSeekConfig, train_config: Mapping[str, Any] | None) -> str:
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": config.to_dict(),
        "train": dict(train_config) if train_config is not None else None,
    }
    return json.dumps(doc, indent=2, default=str) + "\n"


def _write_tokenizer(tokenizer: Any, path: Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        shutil.copyfile(tokenizer, path)
    else:  # a tokenizers.Tokenizer
        tokenizer.save(str(path))


def write_checkpoint(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: DeepSeekConfig,
    *,
    tokenizer: Any = None,
    train_config: Mapping[str, Any] | None = None,
    trainer_state: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a checkpoint directory atomically: a hidden temporary sibling, fsynced, then renamed.

    `tokenizer` is a `tokenizers.Tokenizer` or the path of a tokenizer.json; `chat_template` (Jinja text)
    becomes chat_template.jinja. An existing `out_dir` is
    replaced only once the new one is complete. Failures (a full disk, ...) raise `CheckpointError` naming
    the directory and leave any previous checkpoint as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        write_safetensors(_tensors_to_save(state_dict, config), tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(_config_json(config, train_config))
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
        if chat_template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(chat_template)
        if trainer_state is not None:
            torch.save(dict(trainer_state), tmp / TRAINER_STATE_FILE)
        _fsync_tree(tmp)
        _replace_dir(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {out_dir}: {e}; the previous one is intact") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_model_dir(
    out_dir: str | Path,
    model: torch.nn.Module,
    tokenizer: Any = None,
    train_config: Mapping[str, Any] | None = None,
    *,
    config: DeepSeekConfig | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write `model.safetensors`, `config.json` (and `tokenizer.json`, `chat_template.jinja`) atomically; the
    model's own `config` unless one is given."""
    config = config if config is not None else model.config
    return write_checkpoint(
        out_dir, model.state_dict(), config, tokenizer=tokenizer, train_config=train_config,
        chat_template=chat_template,
    )  # fmt: skip


def save_training_checkpoint(
    run_dir: str | Path,
    step: int,
    state_dict: Mapping[str, torch.Tensor],
    config: DeepSeekConfig,
    trainer_state: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    train_config: Mapping[str, Any] | None = None,
    is_best: bool = False,
    keep_last: int | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step_{step}`, point `latest` (and `best`) at it, prune to the last K."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINTS_DIR / f"step_{step:08d}"
    write_checkpoint(
        path, state_dict, config, tokenizer=tokenizer, train_config=train_config, trainer_state=trainer_state,
        chat_template=chat_template,
    )  # fmt: skip
    rel = f"{CHECKPOINTS_DIR}/{path.name}"
    _symlink_atomic(run_dir / "latest", rel)
    if is_best:
        _symlink_atomic(run_dir / "best", rel)
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    return path


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints, never the one `best` points to."""
    run_dir = Path(run_dir)
    best = (run_dir / "best").resolve() if (run_dir / "best").is_symlink() else None
    found = list_checkpoints(run_dir)
    for path in found[: max(len(found) - max(keep_last, 1), 0)]:
        if best is None or path.resolve() != best:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# reading


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# what to do about a damaged file of a checkpoint
_DAMAGED = (
    "load another checkpoint (a run directory keeps its latest few and its best) or save this one again"
)


def read_config_json(ckpt_dir: str | Path) -> tuple[DeepSeekConfig, dict[str, Any] | None]:
    path = Path(ckpt_dir) / CONFIG_FILE
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {_one_line(e)}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt ({_one_line(e)}): {_DAMAGED}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        hint = "; for a Hugging Face model use `deepseek-lm import`" if "model_type" in doc else ""
        raise CheckpointError(
            f'{path} is not a deepseek-lm checkpoint config (no "format": "{FORMAT}"){hint}'
        )
    if doc.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {doc['version']}; this deepseek-lm reads ≤ {FORMAT_VERSION}"
        )
    try:
        config = DeepSeekConfig.from_dict(doc["model"])
    except (UserError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model config: {_one_line(e)}") from e
    return config, doc.get("train")


def read_model_state(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / MODEL_FILE
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"{path} is corrupt or unreadable ({_one_line(e)}): {_DAMAGED}") from e


def read_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / TRAINER_STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: this checkpoint holds model weights only, it cannot resume"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated zip archives, disallowed globals
        raise CheckpointError(f"{path} is corrupt or unreadable ({_one_line(e)}): {_DAMAGED}") from e


def check_state_matches(
    state: Mapping[str, torch.Tensor], model: torch.nn.Module, config: DeepSeekConfig, source: Path
) -> None:
    """Raise a one-line `CheckpointError` naming `source` when keys or shapes differ from the model's."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop(TIED_HEAD_KEY, None)
        state = {k: v for k, v in state.items() if k != TIED_HEAD_KEY}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
        ]
        raise CheckpointError(f"{source} does not match its config.json: {'; '.join(p for p in parts if p)}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)}, config.json implies {shape}"
            )


def load_model_weights(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], config: DeepSeekConfig, source: Path
) -> None:
    check_state_matches(state, model, config, source)
    model.load_state_dict(state, strict=not config.tie_word_embeddings)


def load_tokenizer_file(ckpt_dir: str | Path) -> Any:
    path = Path(ckpt_dir) / TOKENIZER_FILE
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or unreadable ({_one_line(e)}): {_DAMAGED}") from e


def read_chat_template(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / CHAT_TEMPLATE_FILE
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({_one_line(e)}): {_DAMAGED}") from e


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint (or a run directory's best, else latest) into a fresh model in eval mode."""
    from deepseek_lm.model import get_model

    ckpt_dir = resolve_checkpoint(path)
    config, train_config = read_config_json(ckpt_dir)
    state = read_model_state(ckpt_dir, device)
    model = get_model(config, device=device)
    load_model_weights(model, state, config, ckpt_dir / MODEL_FILE)
    model.eval()
    tokenizer, chat_template = load_tokenizer_file(ckpt_dir), read_chat_template(ckpt_dir)
    return Checkpoint(model, config, tokenizer, train_config, ckpt_dir, chat_template)
