"""`deepseek-lm export` and `deepseek-lm import`: thin entry points over `deepseek_lm.interop` (hf.py, gguf.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jsonargparse import ArgumentParser

from deepseek_lm.cli import parse_args
from deepseek_lm.errors import UserError

# --dtype in either spelling; each format names its types its own way
HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
GGUF_DTYPES = {v: k for k, v in HF_DTYPES.items()}


@dataclass
class ExportArgs:
    """Export a checkpoint as a Hugging Face DeepseekV3 (or, for exact softmax routing, DeepseekV2) directory
    that `AutoModelForCausalLM` and `AutoTokenizer` load without remote code, or as a GGUF file for
    llama.cpp's deepseek2 architecture (llama-cli, llama-server, ollama, LM Studio, llama-cpp-python).

    Args:
        checkpoint: A checkpoint directory, or a run directory (its best checkpoint, else the latest).
        out: The directory (hf) or .gguf file (gguf) to write; an earlier export there is replaced.
        format: The output format.
        dtype: Weight type: float32/f32 is exact; float16/f16, bfloat16/bf16; q8_0 (gguf only: 8-bit blocks).
            The router stays float32 either way.
        pad_heads_for_vllm: (hf only) Zero-pad the attention heads to sizes vLLM's CPU kernels take (q/k heads
            of 32 or more, queries scaled to keep the softmax scale): the same model, larger heads.
    """

    checkpoint: str
    out: str
    format: Literal["hf", "gguf"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16", "f32", "bf16", "f16", "q8_0"] = "float32"
    pad_heads_for_vllm: bool = False


@dataclass
class ImportArgs:
    """Import a Hugging Face DeepseekV3/DeepseekV2 directory (an export, or what transformers'
    `save_pretrained` writes), or a deepseek2 GGUF file, as a deepseek-lm checkpoint.

    Args:
        out: The checkpoint directory to write.
        hf: A Hugging Face model directory: config.json and model.safetensors, or its shards and their index.
        gguf: A deepseek2 GGUF file (f32, f16, bf16 or q8_0 tensors).
    """

    out: str
    hf: str | None = None
    gguf: str | None = None


def _parse(prog: str, cls: type, argv: list[str], switches: tuple[str, ...] = ()) -> dict:
    """`cls`'s fields as options; the boolean fields in `switches` as bare flags (`--pad-heads-for-vllm`)."""
    parser = ArgumentParser(
        prog=f"deepseek-lm {prog}", description=cls.__doc__.split("\n\n")[0], exit_on_error=False
    )
    parser.add_class_arguments(cls, as_group=False, skip=set(switches))
    for name in switches:
        parser.add_argument(
            "--" + name.replace("_", "-"), action="store_true", dest=name, help=_help(cls, name)
        )
    return parse_args(parser, argv).as_dict()


def _help(cls: type, field: str) -> str:
    """The field's description in the class docstring's Args section (up to the next blank line)."""
    return " ".join(cls.__doc__.split(f"{field}:", 1)[1].split("\n\n")[0].split())


def main_export(argv: list[str]) -> int:
    args = ExportArgs(**_parse("export", ExportArgs, argv, switches=("pad_heads_for_vllm",)))
    if args.format == "gguf":
        from deepseek_lm.interop.gguf import export_gguf

        if args.pad_heads_for_vllm:
            raise UserError("--pad-heads-for-vllm is for --format hf (vLLM reads the Hugging Face export)")

        dtype = GGUF_DTYPES.get(args.dtype, args.dtype)
        report = export_gguf(args.checkpoint, args.out, dtype=dtype)
    else:
        from deepseek_lm.interop.hf import export_hf

        if args.dtype == "q8_0":
            raise UserError(
                "--dtype q8_0 is for --format gguf; the hf format takes float32, bfloat16, float16"
            )
        dtype = HF_DTYPES.get(args.dtype, args.dtype)
        report = export_hf(args.checkpoint, args.out, dtype=dtype, pad_heads=args.pad_heads_for_vllm)
    for note in report.notes:
        print(f"note: {note}")
    print(f"exported {args.checkpoint} to {report.path} ({report.model_type}, {dtype})")
    return 0


def main_import(argv: list[str]) -> int:
    args = ImportArgs(**_parse("import", ImportArgs, argv))
    if (args.hf is None) == (args.gguf is None):
        raise UserError("give exactly one of --hf DIR and --gguf FILE; see `deepseek-lm import --help`")
    if args.gguf is not None:
        from deepseek_lm.interop.gguf import import_gguf

        source, report = args.gguf, import_gguf(args.gguf, args.out)
    else:
        from deepseek_lm.interop.hf import import_hf

        source, report = args.hf, import_hf(args.hf, args.out)
    for note in report.notes:
        print(f"note: {note}")
    print(f"imported {source} ({report.model_type}) to {report.path}")
    return 0


__all__ = ["ExportArgs", "ImportArgs", "main_export", "main_import"]
