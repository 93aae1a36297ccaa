import ast
import hashlib
import json
import logging
import subprocess
import sys
import time

import pytest

from deepseek_lm.data import DataError
from deepseek_lm.data import sources as src


@pytest.fixture(scope="module")
def builtin() -> list[str]:
    return src.builtin_documents()


def test_builtin_corpus_is_a_few_megabytes_of_docstrings_and_comments(builtin):
    n_bytes = sum(len(d.encode()) for d in builtin)
    assert 2_500_000 <= n_bytes <= 6_000_000
    assert len(builtin) > 500
    heads = [d.split("\n", 1)[0] for d in builtin]
    assert "module json" in heads and "module collections" in heads
    assert any(h.startswith("topic ") for h in heads)  # pydoc_data help topics
    assert not [h for h in heads if h.startswith("module test.") or ".idle_test" in h or ".tests" in h]
    assert all(d.strip() for d in builtin)
    json_doc = builtin[heads.index("module json")]
    assert "JSON (JavaScript Object Notation)" in json_doc and "\ndef dumps(" in json_doc


MODULE = '''"""The module's docstring."""
# A module-level comment,
# on two lines.

# --------------------------------------
class Parser:
    """Parse things."""

    # the class body's comment
    def feed(self, data):  # a trailing comment is left out
        text = """
        # not a comment: inside a string
        """
        # type: ignore
        # Feed the data (an inner comment).
        return f"""{data}
        # nor this one"""

    def quiet(self):
        # A method with comments only.
        pass
'''


def test_module_document_puts_comments_under_their_scope():
    doc = src._module_document("m", MODULE.encode(), ast.parse(MODULE), set())
    assert doc == (
        "module m\nThe module's docstring.\n\nA module-level comment,\non two lines.\n\n"
        "class Parser\nParse things.\n\nthe class body's comment\n\n"
        "def Parser.feed(self, data)\nFeed the data (an inner comment).\n\n"
        "def Parser.quiet(self)\nA method with comments only."
    )
    seen = {"Parse things.", "A method with comments only."}  # already in an earlier module: dropped
    again = src._module_document("m", MODULE.encode(), ast.parse(MODULE), seen)
    assert "Parse things." not in again and "def Parser.quiet" not in again


def test_builtin_corpus_is_deterministic(builtin):
    digest = hashlib.sha256("\x00".join(builtin).encode()).hexdigest()
    code = "import hashlib; from deepseek_lm.data.sources import builtin_documents as b; "
    code += "print(hashlib.sha256(chr(0).join(b()).encode()).hexdigest())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == digest  # a fresh interpreter: no set/dict-order or hash-seed effects


def test_package_import_is_cheap():
    code = "import sys, deepseek_lm.data; print(sorted({'datasets', 'pyarrow', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_resolve_directories_globs_and_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.txt", "a.md", "sub/c.jsonl", "sub/d.parquet", "notes.csv", ".hidden.txt"]:
        (tmp_path / name).write_text("x")
    found = src.resolve_paths([str(tmp_path)])
    assert [p.name for p in found] == ["a.md", "b.txt", "c.jsonl", "d.parquet"]
    assert [p.name for p in src.resolve_paths([str(tmp_path / "*.txt"), str(tmp_path / "b.txt")])] == [
        "b.txt"
    ]
    assert len(src.resolve_paths([str(tmp_path / "**" / "*")])) == 4  # glob: other types silently skipped


@pytest.mark.parametrize(
    "spec, match",
    [
        ("missing.txt", "missing.txt: no such file or directory"),
        ("empty_dir", "empty_dir: the directory holds no"),
        ("data.csv", "unsupported file type '.csv'"),
        ("*.nothing", r"\*.nothing: no files match"),
    ],
)
def test_resolve_errors(tmp_path, monkeypatch, spec, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match=match):
        src.resolve_paths([spec])


def test_jsonl_with_a_custom_field(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"body": "first\u2028still first"}, {"body": "second", "id": 2}, {"body": "  "}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    assert src.read_file(path, "body") == (["first\u2028still first", "second"], 0)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "ok"}\n{"text": broken}\n', r"d.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', r"d.jsonl:2: no 'text' field \(found: body\).*--text-field"),
        ("[1, 2]\n", r"d.jsonl:1: no 'text' field \(found: a JSON list\)"),
        ('{"text": 3}\n', r"d.jsonl:1: field 'text' is int, not a string"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, match):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        src.read_file(tmp_path / "d.jsonl")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", None, "beta"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert src.read_file(tmp_path / "d.parquet", "content") == (["alpha", "beta"], 0)
    with pytest.raises(DataError, match=r"no 'text' column \(found: content, n\)"):
        src.read_file(tmp_path / "d.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        src.read_file(tmp_path / "bad.parquet")


def test_invalid_utf8_is_replaced_and_counted(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 and \xff\xfe bytes, a real \xef\xbf\xbd stays")
    (tmp_path / "b.txt").write_text("clean")
    with caplog.at_level(logging.WARNING, logger="deepseek_lm.data"):
        docs = src.read_documents(sorted(tmp_path.iterdir()))
    assert docs[0] == "caf\ufffd and \ufffd\ufffd bytes, a real \ufffd stays" and docs[1] == "clean"
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "replaced 3 invalid UTF-8 byte sequence(s)" in warning and "a.txt" in warning


def test_empty_files(tmp_path, caplog):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty.txt: the file is empty"):
        src.read_documents([tmp_path / "empty.txt"])
    (tmp_path / "full.txt").write_text("text")
    with caplog.at_level(logging.WARNING, logger="deepseek_lm.data"):
        assert src.read_documents([tmp_path / "empty.txt", tmp_path / "full.txt"]) == ["text"]
    assert "skipped 1 file(s) with no text" in caplog.text


def _no_proxy(monkeypatch):
    for var in (*src._PROXY_VARS, *src._OFFLINE_VARS, "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


def test_hub_offline_mode_fails_at_once(monkeypatch):
    _no_proxy(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"--dataset some/dataset: offline mode is on \(HF_HUB_OFFLINE=1"):
        src.dataset_documents("some/dataset")


def test_unreachable_hub_fails_within_seconds(monkeypatch):
    _no_proxy(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused, like no network
    start = time.monotonic()
    with pytest.raises(
        DataError, match=r"--dataset some/dataset: the Hugging Face Hub \(127.0.0.1\) is unreachable"
    ):
        src.dataset_documents("some/dataset")
    assert time.monotonic() - start < 30  # generous: the point is "not a 25 s retry loop"


def test_local_dataset_directory_through_datasets(tmp_path):
    (tmp_path / "part.jsonl").write_text('{"story": "once"}\n{"story": "upon"}\n{"story": "a time"}\n')
    assert src.dataset_documents(str(tmp_path), text_field="story", max_documents=2) == ["once", "upon"]
    with pytest.raises(DataError, match=r"row 0 has no 'text' field \(found: story\)"):
        src.dataset_documents(str(tmp_path))
