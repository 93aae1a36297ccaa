"""Export a checkpoint as a Hugging Face DeepseekV3/V2 directory, and import one back (SPEC §7).

An exported directory loads with `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(
out)`, no remote code; it holds config.json, model.safetensors, generation_config.json and the tokenizer
files. Nothing here imports transformers: every file is written by hand, in the format transformers 5.x
writes and 4.x reads.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from deepseek_lm.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    is_checkpoint_dir,
    load_checkpoint,
    load_model_weights,
    save_model_dir,
    write_safetensors,
)
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.interop.common import InteropReport, end_of_turn_ids, refuse_overwrite, with_special_ids
from deepseek_lm.interop.hf_config import HF_MODEL_TYPES, InteropError, from_hf_config, to_hf_config
from deepseek_lm.interop.hf_padding import pad_attention_heads
from deepseek_lm.interop.hf_weights import (
    expected_hf_shapes,
    from_hf_state_dict,
    mtp_layers_present,
    normalize_hf_state,
    to_hf_state_dict,
)

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# export


def export_hf(
    checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", pad_heads: bool = False
) -> InteropReport:
    """Write checkpoint (or a run directory's best, else latest) as a transformers DeepseekV3/V2 directory.

    `dtype` casts the weights (the router stays fp32, as transformers keeps it); float32 is exact.
    `pad_heads`: attention heads zero-padded to the sizes vLLM's CPU kernels take, computing the same
    function (hf_padding.py). Refuses, with the setting named, a model that no transformers class computes
    exactly.
    """
    if dtype not in DTYPES:
        raise InteropError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    ckpt = load_checkpoint(checkpoint)
    config, notes = with_special_ids(ckpt.config, ckpt.tokenizer), []
    state = ckpt.model.state_dict()
    if pad_heads:
        config, state = pad_attention_heads(config, state)
    hf_config = to_hf_config(config, dtype)
    model_type = hf_config["model_type"]
    tensors = to_hf_state_dict(state, config, model_type, DTYPES[dtype])
    _check_tensors(tensors, expected_hf_shapes(config, model_type), f"export of {ckpt.path}")
    out = Path(out)
    refuse_overwrite(out, ckpt.path, looks_ours=_is_hf_export)
    with _atomic_dir(out) as tmp:
        write_safetensors(tensors, tmp / WEIGHTS_FILE)
        _write_json(tmp / CONFIG_FILE, hf_config)
        _write_json(
            tmp / "generation_config.json",
            _generation_config(config, end_of_turn_ids(ckpt.tokenizer, ckpt.chat_template)),
        )
        if ckpt.tokenizer is not None:
            write_tokenizer_files(ckpt.tokenizer, tmp, config, ckpt.chat_template)
        else:
            notes.append(f"{ckpt.path} has no tokenizer.json: the export has no tokenizer files")
    return InteropReport(out, model_type, notes)


def _generation_config(config: DeepSeekConfig, end_of_turn: tuple[int, ...] = ()) -> dict[str, Any]:
    # transformers' generate stops at any id of a list: a chat model's replies end with its end of turn
    eos = [config.eos_token_id, *end_of_turn] if end_of_turn else config.eos_token_id
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}


def write_tokenizer_files(
    tokenizer: Any, out_dir: Path, config: DeepSeekConfig, chat_template: str | None = None
) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json: `AutoTokenizer` then loads a
    `PreTrainedTokenizerFast` that encodes and decodes exactly as the `tokenizers.Tokenizer` does, and whose
    `apply_chat_template` renders the chat format our server uses (the stored template, else the built-in
    one for this tokenizer: data/chat.py)."""
    from deepseek_lm.data.chat import ChatFormat

    tokenizer.save(str(out_dir / "tokenizer.json"))
    names = {
        f"{kind}_token": tokenizer.id_to_token(token_id) if token_id is not None else None
        for kind, token_id in [
            ("bos", config.bos_token_id),
            ("eos", config.eos_token_id),
            ("pad", config.pad_token_id),
        ]
    }
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **names,
            "model_max_length": config.max_position_embeddings,
            # byte-level BPE decodes exactly; the legacy clean-up would delete spaces before punctuation
            "clean_up_tokenization_spaces": False,
            "chat_template": ChatFormat.for_tokenizer(tokenizer, chat_template).template,
        },
    )
    _write_json(out_dir / "special_tokens_map.json", {k: v for k, v in names.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------
# import


def import_hf(hf_dir: str | Path, out: str | Path) -> InteropReport:
    """Read a transformers DeepseekV3/V2 directory (ours or `save_pretrained`'s) into a checkpoint at `out`."""
    hf_dir, out = Path(hf_dir), Path(out)
    raw = _read_hf_config(hf_dir)
    refuse_overwrite(out, hf_dir, looks_ours=is_checkpoint_dir)
    config = from_hf_config(raw, str(hf_dir / CONFIG_FILE))
    weights = read_hf_weights(hf_dir)
    config, notes = _present_mtp_layers(config, weights, hf_dir)
    hf_state = normalize_hf_state(weights, config, str(hf_dir))
    _check_tensors(hf_state, expected_hf_shapes(config, raw["model_type"], shared_copies=False), str(hf_dir))
    model = _build_model(config)
    # our own names and shapes, checked once more by the checkpoint code (one line naming the tensor)
    load_model_weights(model, from_hf_state_dict(hf_state, config, str(hf_dir)), config, hf_dir)
    tokenizer, tokenizer_notes = _read_tokenizer(hf_dir)
    save_model_dir(out, model.eval(), tokenizer, chat_template=_read_chat_template(hf_dir))
    return InteropReport(out, raw["model_type"], tokenizer_notes + notes)


def _present_mtp_layers(
    config: DeepSeekConfig, weights: dict[str, torch.Tensor], hf_dir: Path
) -> tuple[DeepSeekConfig, list[str]]:
    """The config with as many MTP modules as the weights hold: transformers' own config class declares
    num_nextn_predict_layers=1 by default, and its save_pretrained writes no MTP layer."""
    declared, present = config.num_nextn_predict_layers, mtp_layers_present(weights, config)
    if present == declared:
        return config, []
    note = (
        f"{hf_dir / CONFIG_FILE} declares num_nextn_predict_layers={declared} but the weights hold "
        f"{present} MTP layer(s) (model.layers.{config.num_hidden_layers}...): imported with {present}"
        + ("; `generate --speculative` needs at least one" if present == 0 else "")
    )
    return DeepSeekConfig.from_dict({**config.to_dict(), "num_nextn_predict_layers": present}), [note]


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / CONFIG_FILE
    if not hf_dir.is_dir():
        raise InteropError(f"{hf_dir}: no such directory")
    if not path.is_file():
        raise InteropError(f"{hf_dir} is not a Hugging Face model directory (no {CONFIG_FILE})")
    raw = _read_json(path)
    if raw.get("format") == FORMAT:
        raise InteropError(
            f"{hf_dir} is a deepseek-lm checkpoint already; import reads Hugging Face directories"
        )
    return raw


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file

    if (hf_dir / WEIGHTS_FILE).is_file():
        files = [hf_dir / WEIGHTS_FILE]
    elif (hf_dir / WEIGHTS_INDEX_FILE).is_file():
        weight_map = _read_json(hf_dir / WEIGHTS_INDEX_FILE).get("weight_map", {})
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    else:
        pickled = " (pytorch_model.bin is never read: unpickling runs code; re-save it with safetensors)"
        has_bin = any(hf_dir.glob("pytorch_model*.bin"))
        raise InteropError(f"{hf_dir}: no {WEIGHTS_FILE}{pickled if has_bin else ''}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state |= load_file(str(file))
        except Exception as e:  # a missing shard, a truncated or garbled file
            raise InteropError(f"{file} is missing, corrupt or unreadable: {' '.join(str(e).split())}") from e
    return state


def _build_model(config: DeepSeekConfig) -> torch.nn.Module:
    from deepseek_lm.model import get_model

    return get_model(config, device="cpu")


def _read_tokenizer(hf_dir: Path) -> tuple[Any, list[str]]:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None, [f"{hf_dir} has no tokenizer.json: the checkpoint has no tokenizer (generate needs one)"]
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)), []
    except Exception as e:
        raise InteropError(f"{path} is not a valid tokenizer.json: {' '.join(str(e).split())}") from e


def _read_chat_template(hf_dir: Path) -> str | None:
    """transformers' chat template: chat_template.jinja, else tokenizer_config.json's `chat_template` (a
    string, or a list of named templates of which we take "default")."""
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if not (hf_dir / "tokenizer_config.json").is_file():
        return None
    template = _read_json(hf_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


# ---------------------------------------------------------------------------------------------------------
# shared helpers


def _check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str
) -> None:
    """One line naming the first missing, unexpected or mis-shaped tensor (transformers' names)."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InteropError(f"{source}: missing tensor {missing[0]}{more}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise InteropError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, config.json implies {shape}"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise InteropError(
            f"{source}: unexpected tensor {unexpected[0]} (not in a model of this config.json)"
        )


def _is_hf_export(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("model_type") in HF_MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


@contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """Fill the yielded temporary sibling; on success it replaces `out` (an old `out` is removed last), so an
    interrupted export leaves any earlier one intact."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".old-{out.name}-{uuid.uuid4().hex[:8]}") if out.exists() else None
    if old is not None:
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InteropError(f"cannot read {path}: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise InteropError(f"{path} is not a JSON object")
    return data
