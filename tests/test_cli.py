import subprocess
import sys

from deepseek_lm.cli import main


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ["prepare", "train", "generate", "eval", "export", "import", "info", "bench"]:
        assert name in out


def test_unknown_subcommand_is_one_line(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "frobnicate" in err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "deepseek_lm", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("deepseek-lm ")
