"""Compressor baselines: the bits per byte a general-purpose compressor needs for the validation text *given
the training text* — the bar a model trained on that text should beat:

    (size(compress(train + val)) − size(compress(train))) · 8 / bytes(val)

- xz -9e (LZMA through Python's `lzma`, always at hand): a dictionary coder, the weak bar.
- zpaq -m5 (the `zpaq` command, Debian's package `zpaq`; None without it): a context-mixing compressor, the
  kind of model a small language model is up against. Method 5 with 64 MiB blocks (`-m56`), so the capped
  texts below are one block and the validation text is coded with the training text as its context.

The four compressions run at once: lzma releases the GIL and zpaq is a separate process, so on the built-in
corpus (3.4 MB of training text) the whole takes about as long as one zpaq run (~12 s a core on the dev VM).
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

XZ_PRESET = 9 | lzma.PRESET_EXTREME
XZ_TRAIN = 64 << 20  # preset 9's dictionary: xz cannot refer further back than this anyway
XZ_VAL = 16 << 20  # estimate on at most this much validation text, so huge corpora stay quick
ZPAQ_METHOD = "-m56"  # level 5, blocks of 2^6 MiB
ZPAQ_TRAIN = 8 << 20  # zpaq -m5 codes ~0.3 MB/s a core: the training text's last 8 MiB at most
ZPAQ_VAL = 1 << 20


def zpaq_command() -> str | None:
    return shutil.which("zpaq")


def compressor_baselines(train_docs: list[str], val_docs: list[str], *, xz: bool = True, zpaq: bool = True):
    """{"xz_bits_per_byte": ..., "zpaq_bits_per_byte": ...}, each None when not asked for (or, for zpaq,
    when the command is missing or fails: a warning says why)."""
    train, val = "".join(train_docs).encode(), "".join(val_docs).encode()
    zpaq = zpaq and zpaq_command() is not None
    jobs = {}
    with ThreadPoolExecutor(4) as pool:
        if xz:
            jobs["xz"] = _submit_pair(pool, _xz_size, train[-XZ_TRAIN:], val[:XZ_VAL])
        if zpaq:
            jobs["zpaq"] = _submit_pair(pool, _zpaq_size, train[-ZPAQ_TRAIN:], val[:ZPAQ_VAL])
        figures = {name: _conditional(*pair) for name, pair in jobs.items()}
    return {"xz_bits_per_byte": figures.get("xz"), "zpaq_bits_per_byte": figures.get("zpaq")}


def xz_bits_per_byte(train_docs: list[str], val_docs: list[str]) -> float:
    return compressor_baselines(train_docs, val_docs, zpaq=False)["xz_bits_per_byte"]


def zpaq_bits_per_byte(train_docs: list[str], val_docs: list[str]) -> float | None:
    return compressor_baselines(train_docs, val_docs, xz=False)["zpaq_bits_per_byte"]


def _submit_pair(pool: ThreadPoolExecutor, size, train: bytes, val: bytes) -> tuple:
    return pool.submit(size, train), pool.submit(size, train + val), len(val)


def _conditional(size_train, size_both, n_val: int) -> float | None:
    try:
        return round((size_both.result() - size_train.result()) * 8 / max(n_val, 1), 4)
    except ZpaqError as e:
        warnings.warn(f"no zpaq baseline: {e}", stacklevel=3)
        return None


def _xz_size(data: bytes) -> int:
    return len(lzma.compress(data, preset=XZ_PRESET))


class ZpaqError(RuntimeError):
    pass


def _zpaq_size(data: bytes) -> int:
    """The size of a zpaq archive holding `data` as one file (the file's name and the archive's date cost
    the same few bytes in both archives of a pair, so they cancel)."""
    with tempfile.TemporaryDirectory(prefix="zpaq-") as tmp:
        (Path(tmp) / "text").write_bytes(data)
        archive = Path(tmp) / "text.zpaq"
        command = [zpaq_command() or "zpaq", "add", archive.name, "text", ZPAQ_METHOD, "-threads", "1"]
        try:
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        except OSError as e:
            raise ZpaqError(f"{command[0]}: {e}") from None
        if done.returncode != 0 or not archive.is_file():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ZpaqError(f"`{' '.join(command)}` failed (exit {done.returncode}): {last[0]}")
        return archive.stat().st_size


NAMES = {"xz_bits_per_byte": "xz -9", "zpaq_bits_per_byte": "zpaq -m5"}


def named(figures: dict) -> dict[str, float]:
    """{"xz -9": 1.937, "zpaq -m5": 1.511}: the baselines present in `figures` (a manifest, an eval report),
    for the lines and plots that show them beside a model's bits per byte."""
    return {name: figures[key] for key, name in NAMES.items() if figures.get(key) is not None}
