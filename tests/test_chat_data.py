"""Conversations for fine-tuning (data/chat_data.py, data/instructions.py, ChatFormat.encode): which tokens
carry loss, bad lines named, packing that never lets conversations see each other, the resumable loader, and
the built-in instruction set."""

from __future__ import annotations

import ast
import json
import logging

import numpy as np
import pytest
import torch
from test_chat_template import bpe

from deepseek_lm.data import DataError
from deepseek_lm.data.chat import ChatFormat
from deepseek_lm.data.chat_data import (
    IGNORE_INDEX,
    ChatLoader,
    Example,
    collate,
    pack,
    read_chat_jsonl,
    tokenize,
)
from deepseek_lm.data.instructions import module_conversations, parse_module
from deepseek_lm.model import get_model

CONV = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "It serializes an object to a JSON string."},
    {"role": "user", "content": "And the quick brown fox?"},
    {"role": "assistant", "content": "A JSON string."},
]


def test_loss_mask_is_the_assistant_content_and_its_end_token_only():
    tok = bpe(role_tokens=True)
    fmt = ChatFormat.for_tokenizer(tok)
    ids, mask = fmt.encode(tok, CONV)
    # built by hand: each turn is <|role|> content <|end|>, and only an assistant's content and end count
    expected = []
    for m in CONV:
        own = m["role"] == "assistant"
        content = tok.encode(m["content"], add_special_tokens=False).ids
        expected += [(tok.token_to_id(f"<|{m['role']}|>"), False), *[(i, own) for i in content]]
        expected.append((tok.token_to_id("<|end|>"), own))
    assert list(zip(ids, mask)) == expected
    # as training targets: y[j] = ids[j + 1] where that token is the assistant's, else ignored
    (example,) = tokenize([{"messages": CONV, "source": "x"}], fmt, tok)
    assert example.x.tolist() == ids[:-1]
    assert example.y.tolist() == [i if m else IGNORE_INDEX for i, m in zip(ids[1:], mask[1:])]
    assert example.answer_bytes == len(CONV[2]["content"]) + len(CONV[4]["content"])


def test_plain_template_masks_the_answer_and_its_newline():
    tok = bpe()
    ids, mask = ChatFormat.for_tokenizer(tok).encode(tok, CONV[1:3])
    answer = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(answer) == " It serializes an object to a JSON string.\n"
    assert tok.decode(ids[: mask.index(True)]) == "User: What does json.dumps do?\nAssistant:"


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tok = bpe(role_tokens=True)
    # numbers each turn from the end: adding a turn changes every earlier one
    fmt = ChatFormat("{% for m in messages %}{{ messages|length - loop.index }}{{ m.content }}{% endfor %}")
    with pytest.raises(Exception, match="turn by turn"):
        fmt.encode(tok, CONV[1:3])


def test_bad_lines_are_named_with_their_line_numbers_and_counted(tmp_path, caplog):
    good = {"messages": CONV[1:3]}
    lines = [
        json.dumps(good),
        "",  # blank lines are not conversations: ignored
        "{not json",
        "[1, 2]",
        json.dumps({"text": "hello"}),
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        json.dumps({"messages": [{"role": "tool", "content": "x"}, *CONV[2:3]]}),
        json.dumps({**good, "id": "mine"}),
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="deepseek_lm.data"):
        convs = read_chat_jsonl(path)
    assert [c["source"] for c in convs] == ["chats.jsonl:1", "chats.jsonl:8"] and convs[1]["id"] == "mine"
    messages = [r.getMessage() for r in caplog.records]
    expected = {
        3: "not valid JSON",
        4: "not a JSON object but a list",
        5: "no 'messages' field (found: text)",
        6: "no assistant message",
        7: "messages[0].role must be one of",
    }
    for lineno, why in expected.items():
        (line,) = [m for m in messages if m.startswith(f"{path}:{lineno}:")]
        assert why in line and "\n" not in line
    assert messages[-1] == f"{path}: skipped 5 of 7 lines (each named above); 2 conversations kept"
    path.write_text("{bad\n")
    with pytest.raises(DataError, match="none of its 1 line"):
        read_chat_jsonl(path)


def _examples(lengths: list[int], seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        x = rng.integers(2, 300, n)
        y = np.where(np.arange(n) >= n // 2, rng.integers(2, 300, n), IGNORE_INDEX)
        out.append(Example(x, y, answer_bytes=n, source=f"c{i}"))
    return out


def test_packing_places_every_conversation_once_within_the_window():
    examples = _examples([int(n) for n in np.random.default_rng(1).integers(3, 60, 200)])
    windows = pack(examples, 64, np.random.default_rng(2).permutation(len(examples)))
    assert sorted(i for w in windows for i in w) == list(range(len(examples)))
    fill = [sum(len(examples[i].x) for i in w) for w in windows]
    assert max(fill) <= 64
    assert sum(fill) / (64 * len(windows)) > 0.9  # best fit leaves windows nearly full


def test_packed_conversations_never_attend_to_each_other(tiny_config):
    model = get_model(tiny_config).eval()
    examples = _examples([7, 12, 5])
    x, y, inputs = collate(examples, [[0, 1, 2]], 30, pad_id=1, packing=True)  # 24 tokens + 6 of padding
    assert inputs["doc_ids"].tolist() == [[0] * 7 + [1] * 12 + [2] * 5 + [3] * 6]
    with torch.no_grad():
        packed = model(x, **inputs).logits  # (1, 30, V)
        at = 0
        for e in examples:
            alone = model(torch.from_numpy(e.x)[None]).logits  # positions from 0, nothing before it
            torch.testing.assert_close(packed[:, at : at + len(e.x)], alone, atol=1e-5, rtol=1e-5)
            at += len(e.x)
        # the loss of the packed window is the answers' mean over all three
        loss = model(x, targets=y, **inputs).loss
        per_token = torch.cat(
            [torch.nn.functional.cross_entropy(model(torch.from_numpy(e.x)[None]).logits[0], torch.from_numpy(e.y),
                                               reduction="none")[e.y != IGNORE_INDEX] for e in examples]
        )  # fmt: skip
    torch.testing.assert_close(loss, per_token.mean(), atol=1e-5, rtol=1e-5)


def test_padded_rows_hold_one_conversation_each():
    examples = _examples([4, 9])
    x, y = collate(examples, [[0], [1]], 32, pad_id=1, packing=False)
    assert x.shape == (2, 9) and x[0, 4:].eq(1).all() and y[0, 4:].eq(IGNORE_INDEX).all()


def test_chat_loader_resumes_exactly_and_shards_without_overlap():
    examples = _examples([int(n) for n in np.random.default_rng(3).integers(3, 30, 120)])
    a = ChatLoader(examples, 32, 4, pad_id=1, seed=5)
    for _ in range(a.batches_per_epoch + 2):  # into the second epoch
        next(a)
    b = ChatLoader(examples, 32, 4, pad_id=1, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        for u, v in zip(next(a), next(b)):
            assert torch.equal(u["doc_ids"], v["doc_ids"]) if isinstance(u, dict) else torch.equal(u, v)
    with pytest.raises(DataError, match="seq_len 32 -> 64"):
        ChatLoader(examples, 64, 4, pad_id=1, seed=5).load_state_dict(a.state_dict())
    ranks = [ChatLoader(examples, 32, 2, pad_id=1, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [[tuple(r.tolist()) for r in next(loader)[0]] for loader in ranks]
    assert not set(seen[0]) & set(seen[1])


def test_conversations_longer_than_the_window_are_cut_and_counted(caplog):
    examples = _examples([10, 40, 24])  # answers from the middle on: c1's start beyond 16, c2's before
    with caplog.at_level(logging.WARNING, logger="deepseek_lm.data"):
        loader = ChatLoader(examples, 16, 1, pad_id=1, packing=False)
    assert [e.source for e in loader.examples] == ["c0", "c2"] and len(loader.examples[1].x) == 16
    assert (
        "2 conversation(s) longer than the 16-token window were cut to it (e.g. c2), 1 of them dropped"
        in (caplog.text)
    )


SOURCE = '''"""Tools for frobnicating widgets.

More about them."""

def frob(widget, *, times=1):
    """Frobnicate a widget
    the given number of times.

    Details nobody reads."""

def _private():
    """Not asked about."""

class Widget:
    """A widget that can be frobnicated."""

    def spin(self, speed):
        """Spin the widget at the given speed."""

    def _hidden(self):
        """Not asked about either."""
'''


def test_instructions_ask_about_documented_public_names():
    module = parse_module("widgets", ast.parse(SOURCE))
    convs = module_conversations(module, unique={"frob", "Widget"})
    assert all(c["module"] == "widgets" for c in convs)
    turns = [  # (question, answer)
        (c["messages"][i - 1]["content"], m["content"])
        for c in convs
        for i, m in enumerate(c["messages"])
        if m["role"] == "assistant"
    ]
    answers = {a for _, a in turns}
    assert {
        "Tools for frobnicating widgets.",  # the module docstring's first paragraph
        "`frob`.",  # its public functions
        "Frobnicate a widget the given number of times.",  # the first paragraph, on one line
        "`widgets.frob(widget, *, times=1)`",
        "`frob` is in the `widgets` module.",
        "A widget that can be frobnicated.",
        "`Widget` is in the `widgets` module.",
        "`spin`.",  # the class' public methods
        "Spin the widget at the given speed.",
        "`widgets.Widget.spin(speed)`",  # self is not passed
    } <= answers
    assert any("`widgets.frob`" in q for q, _ in turns) and any(
        "`widgets.Widget.spin`" in q for q, _ in turns
    )
    assert not [c for c in convs if "_private" in json.dumps(c) or "_hidden" in json.dumps(c)]
    assert not [
        c for c in convs if c["id"].startswith("widgets.Widget.spin:where")
    ]  # methods via their class


@pytest.mark.slow
def test_builtin_instruction_set_is_split_by_module_as_the_corpus():
    from deepseek_lm.data.instructions import instruction_set
    from deepseek_lm.data.preparation import split_documents
    from deepseek_lm.data.sources import builtin_documents, stdlib_modules

    sets = instruction_set()
    modules = {split: {c["module"] for c in convs} for split, convs in sets.items()}
    name_of = {doc: name for name, _, doc in stdlib_modules() if doc}
    corpus_val = {name_of[d] for d in split_documents(builtin_documents(), 0.05, 0)[1] if d in name_of}
    assert len(sets["train"]) > 5000 and len(sets["val"]) > 300
    assert modules["val"] <= corpus_val and not modules["train"] & corpus_val
    (dumps,) = [c for convs in sets.values() for c in convs if c["id"].startswith("json.dumps:do")]
    assert dumps["messages"][-1 if dumps["id"].endswith(":do") else -3]["content"].startswith(
        "Serialize ``obj`` to a JSON formatted ``str``"
    )


def test_packed_mtp_modules_predict_within_each_conversation_only(tiny_config):
    from dataclasses import replace

    model = get_model(replace(tiny_config, num_nextn_predict_layers=2)).eval()
    examples = _examples([9, 12, 6])
    for e in examples:
        e.y[:] = np.arange(2, 2 + len(e.y))  # every position a target: the depths' crossings would count
    x, y, inputs = collate(examples, [[0, 1, 2]], 32, pad_id=1, packing=True)
    with torch.no_grad():
        packed = model(x, targets=y, **inputs)
        alone = [model(torch.from_numpy(e.x)[None], targets=torch.from_numpy(e.y)[None]) for e in examples]
    for k in range(2):  # per depth: the token-weighted mean of each conversation's own loss
        tokens = sum(a.mtp_tokens[k] for a in alone)
        assert packed.mtp_tokens[k] == tokens  # no prediction reaches from one conversation into the next
        expected = sum(a.mtp_losses[k] * a.mtp_tokens[k] for a in alone) / tokens
        torch.testing.assert_close(packed.mtp_losses[k], expected, atol=1e-5, rtol=1e-5)
