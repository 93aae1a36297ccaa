"""Where text comes from: the built-in corpus, the user's files, a Hugging Face dataset.

Every source gives a list of documents (str). A document is the unit of the train/validation split, and in
the token files each one is followed by the end-of-text token.

The built-in corpus is one document per standard-library module (all of its docstrings and comments, in
source order) plus one per `pydoc_data` help topic. Whole modules rather than single docstrings, because a
method's docstring repeats its class's words: splitting inside a module would leak near-copies into
validation, and the validation loss would flatter the model. The standard library's own test suites add
their docstrings and comments to the training split only (`builtin_training_documents`): more text of the
same kind to learn from, while validation stays the library's modules.
"""

from __future__ import annotations

import ast
import bisect
import glob
import hashlib
import json
import logging
import os
import re
import socket
import sys
import sysconfig
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from deepseek_lm.data import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")

# ---------------------------------------------------------------------------------------------------------
# built-in corpus: docstrings and comments of the standard library's own .py sources, parsed (never
# imported: importing all of the stdlib is slow, has side effects such as `antigravity` opening a browser,
# and depends on the OS)

BUILTIN_VERSION = 3  # bump whenever the extraction below changes: it invalidates prepared caches
_TEST_DIRS = {"test", "tests", "idle_test"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# comment lines that are instructions to tools, not prose
_TOOL_COMMENT = re.compile(r"(type:|noqa|pragma|fmt:|pylint:|isort:|-\*-|!|vim?:)", re.IGNORECASE)


def _stdlib_files(tests: bool = False) -> tuple[Path, list[Path]]:
    """The library's own .py sources, or (`tests`) those of its test suites (none where the interpreter was
    installed without them, as Debian's python3 is)."""
    lib = Path(sysconfig.get_path("stdlib"))
    files = []
    for root, dirs, names in os.walk(lib):
        in_tests = not _TEST_DIRS.isdisjoint(Path(root).relative_to(lib).parts)
        dirs[:] = [
            d for d in dirs
            if d not in _SKIP_DIRS and not d.startswith(("config-", ".")) and (tests or d not in _TEST_DIRS)
        ]  # fmt: skip
        if in_tests == tests:
            files += [
                Path(root, n) for n in names if n.endswith(".py") and not n.startswith("_sysconfigdata")
            ]
    files.sort(key=lambda p: p.relative_to(lib).parts)  # the walk order is the file system's; sort it
    if not files and not tests:
        raise DataError(f"the built-in corpus needs the standard library's .py sources, none found in {lib}")
    return lib, files


def _module_name(lib: Path, path: Path) -> str:
    parts = list(path.relative_to(lib).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _comment_blocks(lines: list[str], tree: ast.Module) -> list[tuple[int, str]]:
    """(first line, text) of each run of whole-line comments, '#' markers and tool pragmas dropped.

    Lines inside multi-line strings are not comments even when they start with '#' (a docstring's example).
    Trailing comments after code are left out: they are terse notes rather than prose.
    """
    hashed = [n for n, line in enumerate(lines, 1) if line.lstrip().startswith("#")]
    in_string = _lines_in_strings(tree, hashed)
    blocks: list[tuple[int, list[str]]] = []
    last = -1
    for number in hashed:
        text = lines[number - 1].strip().lstrip("#").strip()
        if number in in_string or not any(c.isalpha() for c in text) or _TOOL_COMMENT.match(text):
            continue  # rulers ('# ----'), blank comment lines, pragmas
        if number == last + 1 and blocks:
            blocks[-1][1].append(text)
        else:
            blocks.append((number, [text]))
        last = number
    return [(start, "\n".join(texts)) for start, texts in blocks]


def _lines_in_strings(tree: ast.Module, candidates: list[int]) -> set[int]:
    """The lines of `candidates` (sorted) that lie inside a multi-line string literal.

    A walk that enters only nodes spanning several lines with a candidate among them: a full ast.walk
    over the standard library visits 1.2 M nodes, three times the time of parsing it.
    """
    found: set[int] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        for child in ast.iter_child_nodes(stack.pop()):
            first, last = getattr(child, "lineno", None), getattr(child, "end_lineno", None)
            if first is None or last is None:
                stack.append(child)  # no position (arguments, comprehension): look inside
                continue
            i = bisect.bisect_left(candidates, first)
            if last == first or i == len(candidates) or candidates[i] > last:
                continue  # one line, or no candidate inside
            if isinstance(child, ast.JoinedStr) or (
                isinstance(child, ast.Constant) and isinstance(child.value, str)
            ):
                found.update(c for c in candidates[i:] if c <= last)
            else:
                stack.append(child)
    return found


def _module_document(name: str, source: bytes, tree: ast.Module, seen: set[str]) -> str | None:
    """One module's docstrings and comments in source order, each docstring under a pydoc-like heading and
    each comment under the innermost function or class that holds it; texts seen before are dropped."""
    scopes: list[tuple[int, int, str, ast.AST]] = [(0, len(source), f"module {name}", tree)]  # source order

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                scopes.append((child.lineno, child.end_lineno, f"class {prefix}{child.name}", child))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                heading = f"def {prefix}{child.name}({ast.unparse(child.args)})"
                scopes.append((child.lineno, child.end_lineno, heading, child))

    visit(tree, "")
    texts: list[list[str]] = [[] for _ in scopes]
    for i, (*_, node) in enumerate(scopes):
        doc = ast.get_docstring(node)
        texts[i] += [doc.strip()] if doc and doc.strip() else []
    starts = [start for start, *_ in scopes]
    for line, comment in _comment_blocks(source.decode("utf-8", "replace").splitlines(), tree):
        i = bisect.bisect_right(starts, line) - 1
        while scopes[i][1] < line:  # the innermost scope that still holds the line (scopes nest)
            i -= 1
        texts[i].append(comment)
    parts = []
    for (_, _, heading, _), own in zip(scopes, texts):
        new = [t for t in own if t not in seen]
        seen.update(new)
        if new:
            parts.append(heading + "\n" + "\n\n".join(new))
    return "\n\n".join(parts) if parts else None


def stdlib_modules(
    tests: bool = False, seen: set[str] | None = None
) -> Iterator[tuple[str, ast.Module, str | None]]:
    """(module name, syntax tree, its document in the built-in corpus or None) of every standard-library
    source this interpreter parses (`tests`: of its test suites), in corpus order; texts already in `seen`
    (which grows) are left out. The instruction set (instructions.py) reads these."""
    lib, files = _stdlib_files(tests)
    seen = set() if seen is None else seen
    for path in files:
        try:
            source = path.read_bytes()
            with warnings.catch_warnings():  # invalid escape sequences in old sources warn on parse
                warnings.simplefilter("ignore")
                tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a file this interpreter cannot parse (lib2to3 fixtures, a broken install)
        name = _module_name(lib, path)
        yield name, tree, _module_document(name, source, tree, seen)


def builtin_documents() -> list[str]:
    """The built-in corpus: about 3.6 MB of English from this interpreter's standard library (no network)."""
    docs = [doc for _, _, doc in stdlib_modules() if doc]
    from pydoc_data.topics import topics  # pure data (a dict of strings): safe to import

    docs += [f"topic {key}\n{topics[key].strip()}" for key in sorted(topics) if topics[key].strip()]
    return docs


def builtin_training_documents() -> list[str]:
    """The standard library's test suites, one document per module as the library's (Python 3.11: 735
    documents, 2.15 MB), for the training split only. A text equal to one of the library's own docstrings or
    comments is left out: a test that quotes a validation module's docstring must not carry it into training."""
    library: set[str] = set()
    for _ in stdlib_modules(seen=library):
        pass
    return [doc for _, _, doc in stdlib_modules(tests=True, seen=library) if doc]


def builtin_fingerprint() -> dict:
    """What the built-in corpus depends on, cheaply (stat calls, no parsing): the cache key's input part."""
    lib, files = _stdlib_files()
    files += _stdlib_files(tests=True)[1]
    digest = hashlib.sha256()
    for path in files:
        st = path.stat()
        digest.update(f"{path.relative_to(lib)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {
        "builtin": BUILTIN_VERSION,
        "python": sys.version,
        "stdlib": str(lib),
        "files": digest.hexdigest(),
    }


# ---------------------------------------------------------------------------------------------------------
# the user's files


def resolve_paths(specs: list[str]) -> list[Path]:
    """Files, directories (searched recursively) and globs -> the sorted, de-duplicated data files."""
    found: list[Path] = []
    for spec in specs:
        if glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DataError(f"{spec}: no files match this pattern")
            for m in matches:
                found += _expand(Path(m), explicit=False)
        elif Path(spec).exists():
            found += _expand(Path(spec), explicit=True)
        else:
            raise DataError(f"{spec}: no such file or directory")
    if not found:
        raise DataError(f"{' '.join(specs)}: no {', '.join(SUFFIXES)} files found")
    return list(dict.fromkeys(p.resolve() for p in found))


def _expand(path: Path, *, explicit: bool) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in SUFFIXES and not any(s.startswith(".") for s in p.parts)
        )
        if not files and explicit:
            raise DataError(f"{path}: the directory holds no {', '.join(SUFFIXES)} files")
        return files
    if path.suffix.lower() in SUFFIXES:
        return [path]
    if explicit:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return []  # a glob that also matched other files: skip them


def files_fingerprint(paths: list[Path]) -> list[list]:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def decode_utf8(data: bytes) -> tuple[str, int]:
    """UTF-8 text with invalid byte sequences replaced by U+FFFD, and how many were replaced (SPEC §9)."""
    try:
        return data.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="replace")
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


def read_file(path: Path, text_field: str = "text") -> tuple[list[str], int]:
    """The documents of one file and the number of invalid UTF-8 sequences replaced in it."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    text, replaced = decode_utf8(path.read_bytes())
    if suffix == ".jsonl":
        return _read_jsonl(path, text, text_field), replaced
    return ([text] if text.strip() else []), replaced  # .txt, .md: the file is one document


def _read_jsonl(path: Path, text: str, field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is legal inside JSON
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(row, dict) or field not in row:
            keys = ", ".join(map(str, row)) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise DataError(
                f"{path}:{lineno}: no {field!r} field (found: {keys}); choose the field with --text-field"
            )
        value = row[field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string")
        if value.strip():
            docs.append(value)
    return docs


def _read_parquet(path: Path, field: str) -> tuple[list[str], int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(
            f"{path}: no {field!r} column (found: {', '.join(names)}); choose the column with --text-field"
        )
    docs, replaced = [], 0
    for batch in pf.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, bytes):  # a binary column: decode it like a text file
                value, n = decode_utf8(value)
                replaced += n
            if isinstance(value, str) and value.strip():
                docs.append(value)
    return docs, replaced


def read_documents(paths: list[Path], text_field: str = "text") -> list[str]:
    """The documents of all files, in order. Warns once about replaced bytes and skipped empty files."""
    docs, replaced, empty = [], {}, []
    for path in paths:
        file_docs, n = read_file(path, text_field)
        if n:
            replaced[path] = n
        if not file_docs:
            empty.append(path)
        docs += file_docs
    if not docs:
        what = (
            f"{paths[0]}: the file is empty" if len(paths) == 1 else f"all {len(paths)} data files are empty"
        )
        raise DataError(f"{what} (no text); give files that hold text")
    if replaced:
        names = ", ".join(str(p) for p in list(replaced)[:3]) + (", ..." if len(replaced) > 3 else "")
        log.warning(
            "replaced %d invalid UTF-8 byte sequence(s) with U+FFFD in %d file(s): %s",
            sum(replaced.values()),
            len(replaced),
            names,
        )
    if empty:
        log.warning("skipped %d file(s) with no text, e.g. %s", len(empty), empty[0])
    return docs


# ---------------------------------------------------------------------------------------------------------
# Hugging Face datasets (and the hub check the tokenizer shares)

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached now, or None. Takes at most `timeout` seconds.

    huggingface_hub retries an unreachable host for about 25 s (printing each retry); a plain TCP connect
    with a short timeout, in a thread so that a hanging DNS lookup cannot hold us either, answers first.
    """
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"offline mode is on ({var}={os.environ[var]}; unset it to go online)"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None  # only the proxy knows: let the library try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(str(e) or type(e).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not outcome:
        return f"the Hugging Face Hub ({host}) did not answer within {timeout:g} s"
    return f"the Hugging Face Hub ({host}) is unreachable: {outcome[0]}" if outcome[0] else None


def dataset_documents(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
) -> list[str]:
    """Documents from a Hugging Face dataset (streamed), or from a local dataset directory."""
    if not Path(name).exists():
        reason = hub_unreachable_reason()
        if reason:
            raise DataError(
                f"--dataset {name}: {reason}; connect to the network or prepare local files with --data"
            )
    import datasets

    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        docs = []
        for i, row in enumerate(stream):
            if max_documents is not None and len(docs) >= max_documents:
                break
            if text_field not in row:
                raise DataError(
                    f"--dataset {name}: row {i} has no {text_field!r} field (found: {', '.join(row)}); "
                    "choose the field with --text-field"
                )
            if isinstance(row[text_field], str) and row[text_field].strip():
                docs.append(row[text_field])
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"--dataset {name}: could not load it ({type(e).__name__}: {first_line})") from None
    if not docs:
        raise DataError(f"--dataset {name}: split {split!r} holds no text in field {text_field!r}")
    return docs
