"""`deepseek-lm export` and `deepseek-lm import`: thin entry points over `deepseek_lm.interop.hf`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jsonargparse import ArgumentParser

from deepseek_lm.cli import parse_args


@dataclass
class ExportArgs:
    """Export a checkpoint as a Hugging Face DeepseekV3 (or, for exact softmax routing, DeepseekV2) directory
    that `AutoModelForCausalLM` and `AutoTokenizer` load without remote code.

    Args:
        checkpoint: A checkpoint directory, or a run directory (its best checkpoint, else the latest).
        out: The directory to write (replaced only if it holds an earlier export).
        format: The output format.
        dtype: Weight dtype of the export; float32 is exact, the router stays float32 either way.
    """

    checkpoint: str
    out: str
    format: Literal["hf"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class ImportArgs:
    """Import a Hugging Face DeepseekV3/DeepseekV2 directory (an export, or what transformers'
    `save_pretrained` writes) as a deepseek-lm checkpoint.

    Args:
        hf: The Hugging Face model directory: config.json and model.safetensors, or its shards and their index.
        out: The checkpoint directory to write.
    """

    hf: str
    out: str


def _parse(prog: str, cls: type, argv: list[str]) -> dict:
    parser = ArgumentParser(
        prog=f"deepseek-lm {prog}", description=cls.__doc__.split("\n\n")[0], exit_on_error=False
    )
    parser.add_class_arguments(cls, as_group=False)
    return parse_args(parser, argv).as_dict()


def main_export(argv: list[str]) -> int:
    from deepseek_lm.interop.hf import export_hf

    args = ExportArgs(**_parse("export", ExportArgs, argv))
    report = export_hf(args.checkpoint, args.out, dtype=args.dtype)
    for note in report.notes:
        print(f"note: {note}")
    print(f"exported {args.checkpoint} to {report.path} ({report.model_type}, {args.dtype})")
    return 0


def main_import(argv: list[str]) -> int:
    from deepseek_lm.interop.hf import import_hf

    args = ImportArgs(**_parse("import", ImportArgs, argv))
    report = import_hf(args.hf, args.out)
    for note in report.notes:
        print(f"note: {note}")
    print(f"imported {args.hf} ({report.model_type}) to {report.path}")
    return 0


__all__ = ["ExportArgs", "ImportArgs", "main_export", "main_import"]
