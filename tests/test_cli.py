import subprocess
import sys

import pytest

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


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "--checkpoint", "x", "--prompt", "hi", "--max-new-tokens", "abc"],
         "--max-new-tokens: expected an integer, got 'abc'"),
        (["generate", "--checkpoint", "x", "--prompt", "hi", "--temperature", "hot"],
         "--temperature: expected a number, got 'hot'"),
        (["generate", "--prompt", "hi"], "the following arguments are required: --checkpoint"),
        (["eval", "--checkpoint", "x", "--max-batches", "x"], "--max-batches: expected an integer, got 'x'"),
        (["prepare", "--vocab-size", "big"], "--vocab-size: expected an integer, got 'big'"),
        (["info", "--seq-len", "x"], "--seq-len: expected an integer, got 'x'"),
        (["train", "--max-steps", "ten"], "--max-steps: expected an integer, got 'ten'"),
        (["export", "--checkpoint", "x", "--out", "y", "--dtype", "int8"], "--dtype: expected one of"),
        (["bench", "--seq-len", "long"], "--seq-len: expected an integer, got 'long'"),
        (["info", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["prepare", "--config", "/no/such.yaml"], "--config: File does not exist: '/no/such.yaml'"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_naming_the_option(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"deepseek-lm {argv[0]}: error: {expected}"), err
    assert err.endswith(f"see `deepseek-lm {argv[0]} --help`"), err


def test_a_reader_that_leaves_early_stops_the_command_quietly():
    """`deepseek-lm info | head -1`: no "Broken pipe" error when the reader closes the pipe."""
    argv = [sys.executable, "-m", "deepseek_lm", "info", "--preset", "tiny"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command prints (it imports torch first)
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == "", err


def test_notices_are_one_line_and_other_warnings_as_python_shows_them():
    script = (
        "import warnings\n"
        "from deepseek_lm.cli import _one_line_notices\n"
        "from deepseek_lm.model.aot import CompileNotice\n"
        "_one_line_notices('generate')\n"
        "warnings.warn('compiling the decode step once; cached in /tmp/x', CompileNotice)\n"
        "warnings.warn('`isinstance(treespec, LeafSpec)` is deprecated, use ...', FutureWarning)\n"
        "warnings.warn('something else', UserWarning)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    lines = proc.stderr.splitlines()
    assert lines[0] == "deepseek-lm generate: compiling the decode step once; cached in /tmp/x", proc.stderr
    assert "LeafSpec" not in proc.stderr and "UserWarning: something else" in lines[1], proc.stderr
