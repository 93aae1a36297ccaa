"""`deepseek-lm bench`: parse the flags, run the bench (or the speculative one), print the table, write
the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deepseek_lm.bench.config import parse
from deepseek_lm.bench.report import format_table
from deepseek_lm.bench.run import run_bench


def main(argv: list[str]) -> int:
    try:
        cfg = parse(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if cfg.speculative:
        from deepseek_lm.bench import speculative

        result, table = speculative.run(cfg, _log), speculative.format_table
    else:
        result, table = run_bench(cfg), format_table
    print(table(result))
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {path}")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
