import io
import subprocess
import sys
import threading

import pytest
from _trained_tiny import trained_tiny_run

from deepseek_lm.cli import main
from deepseek_lm.generate import Engine
from deepseek_lm.generate.cli import _read_prompts, _unescape


def test_generate_without_a_prompt_is_one_line_error(capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--prompt" in err


@pytest.mark.parametrize(
    "flags, word",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-k", "-3"], "top_k"),
        (["--max-new-tokens", "-1"], "max-new-tokens"),
        (["--batch-size", "0"], "batch-size"),
    ],
)
def test_invalid_sampling_flags_are_one_line_errors(capsys, tmp_path, flags, word):
    # checked before the checkpoint is read: tmp_path is not a checkpoint
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and word in err


def test_missing_checkpoint_is_one_line_error(capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err


def test_prompts_from_flags_file_and_stdin(tmp_path, monkeypatch):
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\n  \nsecond prompt\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    assert _read_prompts(["a", "-"], str(f)) == ["a", "from stdin\n", "first prompt", "second prompt"]
    assert _read_prompts(None, None) == []


def test_empty_or_missing_prompt_file_is_an_error(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for path in [empty, tmp_path / "missing.txt"]:
        assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-file", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(path) in err


def test_stop_strings_understand_newline_escapes():
    assert _unescape("\\n\\n") == "\n\n"
    assert _unescape("END\\t") == "END\t"
    assert _unescape("plain") == "plain"


# ---------------------------------------------------------------------------------------------------------
# on a trained tiny checkpoint


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    return trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


@pytest.fixture(scope="session")
def engine(run_dir):
    return Engine.from_checkpoint(run_dir)


def test_generate_prints_prompt_and_completion(capsys, run_dir, engine):
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "The", "--temperature", "0"]
    assert main([*args, "--max-new-tokens", "20"]) == 0
    expected = engine.generate("The", max_new_tokens=20, temperature=0).text
    assert capsys.readouterr().out == "The" + expected + "\n"


@pytest.mark.slow
def test_compiled_generation_samples_what_eager_does_with_nothing_but_the_text_printed(capsys, run_dir):
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "The", "--max-new-tokens", "12"]
    args += ["--seed", "3"]
    assert main(args) == 0
    eager = capsys.readouterr()
    assert main([*args, "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out and compiled.err == eager.err == ""  # no compiler chatter


def test_generate_batch_from_flags_and_file(capsys, run_dir, engine, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("A function\n\nThe value\n")
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "The", "--prompt-file", str(f)]
    assert main([*argv, "--temperature", "0", "--max-new-tokens", "8", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    for i, prompt in enumerate(["The", "A function", "The value"]):
        text = engine.generate(prompt, max_new_tokens=8, temperature=0).text
        assert f"--- [{i}]" in out and prompt + text in out


def test_generate_reads_the_prompt_from_stdin(capsys, run_dir, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("The"))
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "-", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_long_prompt_warns_on_one_stderr_line(capsys, run_dir, engine):
    prompt = "the " * (engine.context_length + 50)
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", prompt, "--max-new-tokens", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepseek-lm generate: warning: prompt 0 has") and err.count("\n") == 0


def test_interactive_mode_streams_to_a_pipe(run_dir):
    """The reply reaches a reader while the process is still running (stdout is flushed as text comes)."""
    argv = [sys.executable, "-m", "deepseek_lm", "generate", "--checkpoint", str(run_dir), "--interactive"]
    proc = subprocess.Popen(
        [*argv, "--max-new-tokens", "8", "--temperature", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        proc.stdin.write("The\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert proc.poll() is None  # still waiting for the next prompt
        assert line.startswith(">>> The") and len(line.strip()) > len(">>> The")
        proc.stdin.close()
        assert proc.wait() == 0
    finally:
        watchdog.cancel()
        proc.kill()


def test_generate_shows_a_compile_notice_as_a_note_and_hides_torchs_own_deprecation(capsys):
    import warnings

    from deepseek_lm.errors import silence_library_noise
    from deepseek_lm.generate.cli import _show_warning
    from deepseek_lm.model.aot import CompileNotice

    with warnings.catch_warnings():  # as generate sets them up
        warnings.simplefilter("always")
        silence_library_noise()
        warnings.showwarning = _show_warning
        warnings.warn("compiling the decode step once", CompileNotice, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("the prompt was cut to fit the context", UserWarning, stacklevel=1)
    assert capsys.readouterr().err.splitlines() == [
        "deepseek-lm generate: compiling the decode step once",
        "deepseek-lm generate: warning: the prompt was cut to fit the context",
    ]
