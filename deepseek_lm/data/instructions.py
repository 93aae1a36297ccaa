"""The built-in instruction set: questions about the standard library, answered from its own docstrings.

Generated offline from what the built-in corpus already parses (`sources.stdlib_modules`, the syntax trees
of the standard library's sources, never imported), so it is the same for a given Python and needs no
network. For every public module, function, class and method with a docstring:

    What does `json.dumps` do?                 → the docstring's first paragraph
    What arguments does `json.dumps` take?     → `json.dumps(obj, *, skipkeys=False, ...)`
    Which module provides `dumps`?             → `dumps` is in the `json` module.   (names unique in the stdlib)
    What is the `json` module for?             → the module docstring's first paragraph
    Which functions does the `json` module provide?  /  Which methods does `json.JSONDecoder` have?

in a few phrasings, some with a system message, some as two turns ("And what arguments does it take?"),
each choice a hash of the name so that it never depends on the run. The split is the corpus' own: a module
whose document went to the corpus' validation split gives validation conversations, so evaluation asks about
functions whose docstrings the model saw neither in pretraining nor answered in fine-tuning.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

INSTRUCTIONS_VERSION = 1  # bump whenever the generator changes: it invalidates prepared directories
SYSTEM_PROMPT = "You answer questions about the Python standard library."
MAX_ANSWER_CHARS = 400  # a longer first paragraph is cut at its last sentence end before this
MAX_SIGNATURE_CHARS = 160
MAX_LISTED = 10  # names in a "which functions / methods" answer before "and N more"

# fmt: off
ASK_DO = ("What does `{}` do?", "What is `{}` for?", "Explain what `{}` does.")
ASK_CLASS = ("What is `{}`?", "What is the class `{}` for?", "Describe the class `{}`.")
ASK_ARGS = ("What arguments does `{}` take?", "What is the signature of `{}`?", "How do I call `{}`?")
ASK_ARGS_AFTER = ("And what arguments does it take?", "What is its signature?")
ASK_WHERE = ("Which module provides `{}`?", "Where is `{}` defined?", "In which module is `{}`?")
ASK_MODULE = ("What is the `{}` module for?", "What does the `{}` module do?", "Describe the `{}` module.")
ASK_FUNCTIONS = ("Which functions does the `{}` module provide?", "List the functions of the `{}` module.")
ASK_METHODS = ("Which methods does `{}` have?", "List the methods of `{}`.")
# fmt: on


@dataclass
class Entry:
    """A documented public function, class or method."""

    module: str
    qualname: str  # dumps, JSONDecoder, JSONDecoder.decode
    kind: str  # function | class | method
    args: str  # the parameters as written in the source (self / cls dropped); "" for a class
    summary: str | None  # the docstring's first paragraph, or None when it makes no answer
    methods: list[str] = field(default_factory=list)  # a class's public methods

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"


@dataclass
class Module:
    name: str
    summary: str | None
    entries: list[Entry]
    functions: list[str]  # public top-level functions, documented or not, in source order


def instruction_set(val_fraction: float = 0.05, split_seed: int = 0) -> dict[str, list[dict]]:
    """{"train": [...], "val": [...]} conversations ({"id", "messages"}), split by module as the built-in
    corpus is with the same `val_fraction` and `split_seed` (those of `prepare`)."""
    from deepseek_lm.data.preparation import split_documents
    from deepseek_lm.data.sources import builtin_documents, stdlib_modules

    modules, module_docs = [], {}
    for name, tree, doc in stdlib_modules():
        if doc is not None and _public(name):
            modules.append(parse_module(name, tree))
            module_docs[name] = doc
    # the corpus' own split (the documents are split as a whole, so it is read back, not recomputed)
    _, val_docs, _ = split_documents(builtin_documents(), val_fraction, split_seed)
    val_docs = set(val_docs)
    unique = _unique_names(modules)
    out: dict[str, list[dict]] = {"train": [], "val": []}
    for module in modules:
        out["val" if module_docs[module.name] in val_docs else "train"] += module_conversations(
            module, unique
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# reading the syntax trees


def _public(dotted: str) -> bool:
    return not any(part.startswith("_") for part in dotted.split("."))


def parse_module(name: str, tree: ast.Module) -> Module:
    entries, functions = [], []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _public(node.name):
            functions.append(node.name)
            if ast.get_docstring(node):
                entries.append(_function(name, node.name, node, "function"))
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            methods = [
                m
                for m in node.body
                if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef) and _public(m.name)
            ]
            if ast.get_docstring(node):
                summary = first_paragraph(ast.get_docstring(node))
                entries.append(Entry(name, node.name, "class", "", summary, [m.name for m in methods]))
            entries += [
                _function(name, f"{node.name}.{m.name}", m, "method") for m in methods if ast.get_docstring(m)
            ]
    return Module(name, first_paragraph(ast.get_docstring(tree) or ""), entries, functions)


def _function(module: str, qualname: str, node: ast.FunctionDef | ast.AsyncFunctionDef, kind: str) -> Entry:
    args = node.args
    if kind == "method" and args.posonlyargs + args.args:  # the bound first argument is not passed
        first = (args.posonlyargs + args.args)[0].arg
        if first in ("self", "cls"):
            args = ast.arguments(
                posonlyargs=args.posonlyargs[1:] if args.posonlyargs else [],
                args=args.args if args.posonlyargs else args.args[1:],
                vararg=args.vararg, kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults,
                kwarg=args.kwarg, defaults=args.defaults,
            )  # fmt: skip
    return Entry(module, qualname, kind, ast.unparse(args), first_paragraph(ast.get_docstring(node) or ""))


def first_paragraph(doc: str) -> str | None:
    """The docstring's first paragraph on one line, cut at a sentence end to MAX_ANSWER_CHARS; None when
    it is too short to answer anything or only a signature (`f(x) -> y`)."""
    text = " ".join(doc.strip().split("\n\n", 1)[0].split())
    if len(text) > MAX_ANSWER_CHARS:
        cut = text.rfind(". ", 0, MAX_ANSWER_CHARS)
        if cut < 0:
            return None
        text = text[: cut + 1]
    if len(text) < 12 or not re.search(r"[a-z]{3}", text) or re.fullmatch(r"[\w.]+\(.*\)( -> .*)?", text):
        return None
    return text


def _unique_names(modules: list[Module]) -> set[str]:
    """Top-level function and class names defined by exactly one public module (others have no one answer)."""
    counts = Counter(e.qualname for m in modules for e in m.entries if e.kind != "method")
    return {name for name, n in counts.items() if n == 1}


# ---------------------------------------------------------------------------------------------------------
# conversations


def _pick(key: str, options: tuple[str, ...]) -> str:
    """A phrasing chosen by a stable hash of `key` (Python's hash() changes per process)."""
    return options[_hash(key) % len(options)]


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def _listing(names: list[str]) -> str:
    shown = [f"`{n}`" for n in names[:MAX_LISTED]]
    if len(names) > MAX_LISTED:
        return ", ".join(shown) + f" and {len(names) - MAX_LISTED} more."
    return shown[0] + "." if len(shown) == 1 else ", ".join(shown[:-1]) + f" and {shown[-1]}."


def _signature(e: Entry) -> str | None:
    if len(e.args) > MAX_SIGNATURE_CHARS:
        return None
    return f"`{e.name}({e.args})`" if e.args else f"`{e.name}()` takes no arguments."


def _conversation(module: str, key: str, turns: list[tuple[str, str]]) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if _hash("system " + key) % 5 == 0 else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"id": key, "module": module, "messages": messages}


def entry_conversations(e: Entry, unique: set[str]) -> list[dict]:
    convs = []
    signature = _signature(e) if e.kind != "class" else None
    if e.summary:
        ask = _pick(e.name, ASK_CLASS if e.kind == "class" else ASK_DO).format(e.name)
        if signature and _hash("two turns " + e.name) % 3 == 0:  # a follow-up that needs the history
            turns = [(ask, e.summary), (_pick("after " + e.name, ASK_ARGS_AFTER), signature)]
            convs.append(_conversation(e.module, f"{e.name}:do+args", turns))
            signature = None  # asked
        else:
            convs.append(_conversation(e.module, f"{e.name}:do", [(ask, e.summary)]))
    if signature:
        convs.append(
            _conversation(
                e.module, f"{e.name}:args", [(_pick("args " + e.name, ASK_ARGS).format(e.name), signature)]
            )
        )
    if e.kind != "method" and e.qualname in unique:
        ask = _pick("where " + e.name, ASK_WHERE).format(e.qualname)
        convs.append(
            _conversation(
                e.module, f"{e.name}:where", [(ask, f"`{e.qualname}` is in the `{e.module}` module.")]
            )
        )
    if e.kind == "class" and e.methods:
        ask = _pick("methods " + e.name, ASK_METHODS).format(e.name)
        convs.append(_conversation(e.module, f"{e.name}:methods", [(ask, _listing(e.methods))]))
    return convs


def module_conversations(m: Module, unique: set[str]) -> list[dict]:
    convs = []
    if m.summary:
        convs.append(
            _conversation(m.name, f"{m.name}:module", [(_pick(m.name, ASK_MODULE).format(m.name), m.summary)])
        )
    if m.functions:
        ask = _pick("functions " + m.name, ASK_FUNCTIONS).format(m.name)
        convs.append(_conversation(m.name, f"{m.name}:functions", [(ask, _listing(m.functions))]))
    for e in m.entries:
        convs += entry_conversations(e, unique)
    return convs
