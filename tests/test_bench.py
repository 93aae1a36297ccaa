"""Smoke tests of `deepseek-lm bench` on the tiny preset with tiny step counts: it runs, prints the table and
writes the documented JSON keys. Never timing thresholds (SPEC §8: benchmarks are not pass/fail)."""

import json
import subprocess
import sys

import pytest

from deepseek_lm.bench import main, parse
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError

TINY = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "0",
        "--rounds", "1", "--prompt-len", "4", "--new-tokens", "3", "--decode-batch", "2",
        "--ctx-len", "24", "--ctx-new-tokens", "2"]  # fmt: skip
KEYS = {
    "train_tokens_per_s", "train_peak_mem_mb", "decode_tokens_per_s_b1", "decode_tokens_per_s_b1_ctx2k",
    "decode_tokens_per_s_b8", "kv_cache_bytes_per_token",
}  # fmt: skip
MACHINE = {"cpu", "cores", "torch", "device", "commit", "date"}


def test_bench_ours_only_table_and_json_without_transformers(tmp_path):
    out = tmp_path / "bench.json"
    # a fresh interpreter, so that "transformers was not imported" means something
    code = (
        "import sys\nfrom deepseek_lm.bench import main\n"
        f"rc = main({[*TINY, '--json', str(out)]!r})\n"
        "assert 'transformers' not in sys.modules, 'the bench imported transformers without --compare-hf'\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train tokens/s" in proc.stdout and "decode tokens/s, b1" in proc.stdout
    result = json.loads(out.read_text())
    assert result["hf"] is None and result["ratio"] is None
    assert KEYS | {"mfu"} <= set(result["ours"])
    assert set(result["machine"]) >= MACHINE
    assert all(result["ours"][k] > 0 for k in KEYS)
    cfg = DeepSeekConfig.from_preset("tiny")
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # the latent cache: nothing else per token
    assert result["ours"]["kv_cache_bytes_per_token"] == cfg.num_hidden_layers * per_layer * 4


@pytest.mark.slow  # two spawned training processes and both models: ≈ 30 s on 2 cores
def test_bench_compare_hf(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    assert main([*TINY, "--compare-hf", "--json", str(out)]) == 0
    assert "transformers" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["hf"]) >= KEYS and "mfu" in result["ours"]
    assert set(result["ratio"]) >= KEYS
    assert result["ratio"]["train_tokens_per_s"] == pytest.approx(
        result["ours"]["train_tokens_per_s"] / result["hf"]["train_tokens_per_s"]
    )
    assert result["settings"]["hf_implementation"]["attn"]


def test_compare_hf_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(UserError, match="pip install transformers"):
        main([*TINY, "--compare-hf"])


@pytest.mark.parametrize(
    "argv,message",
    [(["--preset", "nope"], "unknown preset"), (["--steps", "0"], "--steps must be > 0"),
     (["--new-tokens", "1"], "must be >= 2")],
)  # fmt: skip
def test_bad_arguments_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse([*TINY, *argv])


def test_import_deepseek_lm_does_not_import_the_bench():
    code = "import sys, deepseek_lm; assert 'deepseek_lm.bench' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_speculative_bench_on_a_trained_checkpoint(tmp_path_factory, capsys):
    from _trained_tiny import trained_tiny_run

    run = trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")
    out = tmp_path_factory.mktemp("spec") / "spec.json"
    argv = ["--checkpoint", str(run), "--speculative", "--draft-tokens", "2", "--rounds", "1", "--prompt-len", "4",
            "--new-tokens", "5", "--decode-batch", "2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "batch 2, greedy" in capsys.readouterr().out
    figures = json.loads(out.read_text())["figures"]
    assert set(figures) == {"b1_greedy", "b8_greedy", "b1_sampled"} and figures["b8_greedy"]["batch"] == 2
    for f in figures.values():
        assert f["plain_tokens_per_s"] > 0 and f["speculative_tokens_per_s"] > 0
        assert 0 <= f["acceptance"] <= 1 and 1 <= f["tokens_per_round"] <= 3


def test_speculative_bench_needs_a_checkpoint_with_mtp(tmp_path):
    from deepseek_lm.checkpoint import save_model_dir
    from deepseek_lm.model import get_model

    with pytest.raises(UserError, match="--speculative needs --checkpoint"):
        parse(["--speculative"])
    ckpt = save_model_dir(tmp_path / "ckpt", get_model(DeepSeekConfig.from_preset("tiny")))
    with pytest.raises(UserError, match="no MTP modules"):
        main(["--checkpoint", str(ckpt), "--speculative"])
