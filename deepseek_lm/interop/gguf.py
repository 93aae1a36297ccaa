"""Export a checkpoint as a GGUF file for llama.cpp's `deepseek2` architecture, and import one back (SPEC §11).

    from deepseek_lm.interop import export_gguf, import_gguf
    export_gguf("runs/demo", "demo.gguf")               # llama-cli -m demo.gguf, ollama, LM Studio, ...
    export_gguf("runs/demo", "demo-q8.gguf", dtype="q8_0")
    import_gguf("demo.gguf", "ckpt")                    # back to a checkpoint; f32 round-trips bit-exactly

The file is written with the `gguf` package (llama.cpp's own writer): the architecture keys (gguf_config.py),
the tensors (gguf_names.py), the tokenizer and chat template (gguf_vocab.py). Nothing else is needed: no
llama.cpp, no transformers.

Types: f32 is exact; f16 / bf16 round every weight; q8_0 stores blocks of 32 weights as 8-bit integers with
one f16 scale (a weight whose rows are not a multiple of 32 wide stays f16, as llama.cpp's tools do). Norms,
1-D tensors and the router stay f32 in every type.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepseek_lm.checkpoint import load_checkpoint, save_model_dir
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.interop.common import InteropReport, end_of_turn_ids, refuse_overwrite, with_special_ids
from deepseek_lm.interop.gguf_config import ARCH, check_exportable, config_from_metadata, config_metadata
from deepseek_lm.interop.gguf_names import expected_gguf_shapes, from_gguf_tensors, keeps_f32, to_gguf_tensors
from deepseek_lm.interop.gguf_vocab import SpecialIds, tokenizer_from_metadata, vocab_for_export
from deepseek_lm.interop.hf_config import InteropError

GGUF_MAGIC = b"GGUF"
DTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp supports one MTP block in its deepseek2 graph (src/models/deepseek2.cpp, graph_mtp)
LLAMA_CPP_MTP_MODULES = 1


# ---------------------------------------------------------------------------------------------------------
# export


def export_gguf(checkpoint: str | Path, out_path: str | Path, dtype: str = "f32") -> InteropReport:
    """Write checkpoint (or a run directory's best, else latest) as a deepseek2 GGUF file at `out_path`.

    Written to a temporary file beside it and renamed, so an interrupted export leaves nothing half-written
    (and any earlier file intact). Refuses, naming the setting, a model llama.cpp would not compute exactly.
    """
    if dtype not in DTYPES:
        raise InteropError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out_path)
    _refuse_gguf_overwrite(out)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.tokenizer is None:
        raise InteropError(
            f"{ckpt.path} has no tokenizer.json, and llama.cpp loads no GGUF without a vocabulary: copy the "
            "tokenizer.json the model was trained with into it"
        )
    config, notes = with_special_ids(ckpt.config, ckpt.tokenizer), []
    check_exportable(config)
    mtp = min(config.num_nextn_predict_layers, LLAMA_CPP_MTP_MODULES)
    if config.num_nextn_predict_layers > mtp:
        notes.append(
            f"{ckpt.path} has {config.num_nextn_predict_layers} MTP modules; llama.cpp's deepseek2 runs one, "
            f"so the file holds the first"
        )
    metadata = (
        config_metadata(config, mtp) + _file_metadata(ckpt.path, dtype) + _tokenizer_metadata(ckpt, config)
    )
    tensors = to_gguf_tensors(ckpt.model.state_dict(), config, mtp)
    _write_atomically(out, metadata, tensors, dtype)
    return InteropReport(out, ARCH, notes)


def _file_metadata(source: Path, dtype: str) -> list[tuple[str, Any, Any]]:
    from gguf import GGML_QUANT_VERSION, GGUFValueType, Keys, LlamaFileType

    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                 "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype]  # fmt: skip
    U32 = GGUFValueType.UINT32
    return [
        (Keys.General.NAME, source.name if source.name not in ("best", "latest") else source.parent.name,
         GGUFValueType.STRING),
        (Keys.General.FILE_TYPE, int(file_type), U32),
        (Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, U32),
    ]  # fmt: skip


def _tokenizer_metadata(ckpt: Any, config: DeepSeekConfig) -> list[tuple[str, Any, Any]]:
    from gguf import GGUFValueType, Keys

    from deepseek_lm.data.chat import ChatFormat
    from deepseek_lm.data.tokenizer import special_token_ids

    end_of_turn = end_of_turn_ids(ckpt.tokenizer, ckpt.chat_template)
    # bos as our chat templates see it (ChatFormat's `bos_token`); llama.cpp never adds it to a text
    bos = config.bos_token_id if config.bos_token_id is not None else special_token_ids(ckpt.tokenizer)["bos"]
    special = SpecialIds(
        config.eos_token_id, config.pad_token_id, bos, end_of_turn[0] if end_of_turn else None
    )
    vocab = vocab_for_export(ckpt.tokenizer, config.vocab_size, special)
    template = ChatFormat.for_tokenizer(ckpt.tokenizer, ckpt.chat_template).template
    return [*vocab.metadata(), (Keys.Tokenizer.CHAT_TEMPLATE, template, GGUFValueType.STRING)]


def _encode(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type) of one tensor in a file of `dtype` (see the module docstring for the rules)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    wanted = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
              "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}[dtype]  # fmt: skip
    data = tensor.to(torch.float32).numpy()
    if keeps_f32(name, tensor):
        wanted = GGMLQuantizationType.F32
    block, _ = GGML_QUANT_SIZES[wanted]
    if data.shape[-1] % block:  # a row that is no whole number of q8_0 blocks
        wanted = GGMLQuantizationType.F16
    return quants.quantize(data, wanted), wanted


def _write_atomically(
    out: Path, metadata: list[tuple[str, Any, Any]], tensors: dict[str, torch.Tensor], dtype: str
) -> None:
    from gguf import GGUFWriter

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    writer = GGUFWriter(tmp, ARCH)
    try:
        for k, value, vtype in metadata:
            writer.add_key_value(k, value, vtype, sub_type=_array_type(value))
        for name, tensor in tensors.items():
            data, ggml_type = _encode(name, tensor, dtype)
            writer.add_tensor(name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _array_type(value: Any) -> Any:
    """The element type of an array value (GGUFWriter guesses it from the first element otherwise)."""
    from gguf import GGUFValueType

    if not isinstance(value, list):
        return None
    return GGUFValueType.STRING if value and isinstance(value[0], str) else GGUFValueType.INT32


def _refuse_gguf_overwrite(out: Path) -> None:
    """Replace an earlier GGUF, never a directory or another kind of file."""
    if out.is_dir():
        raise InteropError(f"--out {out} is a directory; give the path of the .gguf file to write")
    if out.exists() and _magic(out) != GGUF_MAGIC:
        raise InteropError(f"--out {out} exists and is not a GGUF file; choose another path")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


# ---------------------------------------------------------------------------------------------------------
# import

# the tensor types import reads: float, and 8-bit blocks dequantised to f32
READABLE_TYPES = ("F32", "F16", "BF16", "Q8_0")


def import_gguf(gguf_path: str | Path, out: str | Path) -> InteropReport:
    """Read a deepseek2 GGUF (f32, f16, bf16 or q8_0 tensors) into a checkpoint directory at `out`."""
    from gguf import Keys

    path, out = Path(gguf_path), Path(out)
    reader = _open(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise InteropError(
            f"{path} is a GGUF of architecture {arch!r}; import reads {ARCH} (DeepSeek-V2/V3) files"
        )
    refuse_overwrite(out, path, looks_ours=_is_checkpoint_dir)
    raw = _read_tensors(reader, path)
    if "token_embd.weight" not in raw:
        raise InteropError(f"{path}: missing tensor token_embd.weight")
    vocab_rows = raw["token_embd.weight"].shape[0]
    config = config_from_metadata(meta, vocab_rows, "output.weight" not in raw, str(path))
    config, raw, notes = _present_mtp(config, raw, path)
    _check_shapes(raw, expected_gguf_shapes(config), path)
    tokenizer, tokenizer_notes = tokenizer_from_metadata(meta, str(path))
    model = _model(config, from_gguf_tensors(raw, config), path)
    # the file's template is kept even when it is the one deepseek-lm would pick anyway: the same chat format
    template = meta.get(Keys.Tokenizer.CHAT_TEMPLATE) if tokenizer is not None else None
    save_model_dir(out, model, tokenizer, chat_template=template)
    return InteropReport(out, ARCH, tokenizer_notes + notes)


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise InteropError(f"{path}: no such file")
    if _magic(path) != GGUF_MAGIC:
        raise InteropError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:  # a header or tensor table cut short, or nonsense in it
        detail = " ".join(str(e).split())
        raise InteropError(
            f"{path} is truncated or corrupt ({path.stat().st_size:,} bytes; {detail}): export or download "
            "it again"
        ) from e


def _metadata(reader: Any) -> dict[str, Any]:
    """key -> value (str, number, bool or list) of every metadata field."""
    from gguf import GGUFValueType

    meta = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = f.contents()
        meta[name] = bool(value) if f.types == [GGUFValueType.BOOL] else value
    return meta


def _read_tensors(reader: Any, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor as float32 (f16, bf16 and q8_0 dequantised), copied out of the memory map."""
    from gguf import quants

    tensors = {}  # (a tensor cut short by the end of the file has already failed the reader: _open)
    for t in reader.tensors:
        if t.tensor_type.name not in READABLE_TYPES:
            raise InteropError(
                f"{path}: tensor {t.name} is {t.tensor_type.name}, a quantisation import does not read "
                f"(it reads {', '.join(READABLE_TYPES)}); import an f16 or q8_0 file of the model instead"
            )
        data = quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
    return tensors


def _present_mtp(
    config: DeepSeekConfig, raw: dict[str, torch.Tensor], path: Path
) -> tuple[DeepSeekConfig, dict[str, torch.Tensor], list[str]]:
    """The config with the MTP modules the file really holds (llama.cpp loads a file without them), and the
    tensors without the MTP blocks' copies of the embedding and head (ours share the main ones)."""
    from gguf import MODEL_TENSOR as T

    from deepseek_lm.interop.gguf_names import gguf_name

    L, notes = config.num_hidden_layers, []
    copies = {T.NEXTN_EMBED_TOKENS: "token_embd.weight", T.NEXTN_SHARED_HEAD_HEAD: "output.weight"}
    for layer in range(L, L + config.num_nextn_predict_layers):
        for tensor, main in copies.items():
            name = gguf_name(tensor, "weight", layer)
            if name in raw:
                main = main if main in raw else "token_embd.weight"
                if not torch.equal(raw.pop(name), raw[main]):
                    raise InteropError(
                        f"{path}: {name} differs from {main}; deepseek-lm's MTP modules share the main "
                        "model's embedding and head"
                    )
    present = sum(
        gguf_name(T.NEXTN_EH_PROJ, "weight", L + k) in raw for k in range(config.num_nextn_predict_layers)
    )
    if present != config.num_nextn_predict_layers:
        notes.append(f"{path} declares {config.num_nextn_predict_layers} MTP block(s) but holds {present}")
        config = DeepSeekConfig.from_dict({**config.to_dict(), "num_nextn_predict_layers": present})
        raw = {k: v for k, v in raw.items() if not _block_at_least(k, L + present)}
    return config, raw, notes


def _block_at_least(name: str, first: int) -> bool:
    return name.startswith("blk.") and int(name.split(".")[1]) >= first


def _check_shapes(raw: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path) -> None:
    """One line naming the first missing, unexpected or mis-shaped tensor (GGUF names, numpy order)."""
    missing = [k for k in expected if k not in raw]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InteropError(f"{path}: missing tensor {missing[0]}{more}")
    unexpected = sorted(set(raw) - set(expected))
    if unexpected:
        raise InteropError(f"{path}: unexpected tensor {unexpected[0]} (not in a model of this metadata)")
    for name, shape in expected.items():
        if tuple(raw[name].shape) != shape:
            raise InteropError(
                f"{path}: tensor {name} has shape {tuple(raw[name].shape)}, the metadata implies {shape}"
            )


def _model(config: DeepSeekConfig, state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    from deepseek_lm.checkpoint import load_model_weights
    from deepseek_lm.model import get_model

    model = get_model(config, device="cpu")
    load_model_weights(model, state, config, path)
    return model.eval()


def _is_checkpoint_dir(path: Path) -> bool:
    from deepseek_lm.checkpoint import is_checkpoint_dir

    return is_checkpoint_dir(path)
