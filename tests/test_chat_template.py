"""Chat format (data/chat.py): rendering, message checks, the checkpoint's chat_template.jinja, and the HF
export whose `apply_chat_template` must give exactly our ids (transformers is the independent renderer)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from deepseek_lm.checkpoint import load_checkpoint, save_model_dir
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.data.chat import (
    PLAIN_CHAT_TEMPLATE,
    PLAIN_STOP,
    ROLE_TOKENS,
    TOKEN_CHAT_TEMPLATE,
    ChatFormat,
    check_messages,
)
from deepseek_lm.errors import UserError
from deepseek_lm.model import get_model

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "It serializes an object to a JSON string."},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "loads?"}]},
]


def bpe(role_tokens: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [m["content"] for m in CHAT[:3]] + ["User: Assistant: System: the quick brown fox"]
    tok.train_from_iterator(texts * 20, trainer)
    if role_tokens:
        tok.add_special_tokens(list(ROLE_TOKENS))
    return tok


def test_plain_template_renders_roles_as_lines():
    text = ChatFormat.for_tokenizer(bpe()).render(CHAT)
    assert text == (
        "System: Answer briefly.\n"
        "User: What does json.dumps do?\n"
        "Assistant: It serializes an object to a JSON string.\n"
        "User: And loads?\n"
        "Assistant:"
    )
    assert ChatFormat.for_tokenizer(bpe()).render(CHAT[:2], add_generation_prompt=False).endswith("do?\n")


def test_role_tokens_pick_the_token_template_and_its_end_token():
    tok = bpe(role_tokens=True)
    fmt = ChatFormat.for_tokenizer(tok)
    assert fmt.template == TOKEN_CHAT_TEMPLATE and fmt.stop == ()
    assert fmt.stop_token_ids == (tok.token_to_id("<|end|>"),)
    assert fmt.render(CHAT[1:3]) == (
        "<|user|>What does json.dumps do?<|end|>"
        "<|assistant|>It serializes an object to a JSON string.<|end|><|assistant|>"
    )
    plain = ChatFormat.for_tokenizer(bpe())
    assert plain.template == PLAIN_CHAT_TEMPLATE and plain.stop == PLAIN_STOP and plain.stop_token_ids == ()


def test_the_user_turn_token_is_a_special_token_of_the_user_role_alone():
    tok = bpe(role_tokens=True)
    assert ChatFormat.for_tokenizer(tok).user_turn_ids(tok) == (tok.token_to_id("<|user|>"),)
    assert ChatFormat.for_tokenizer(bpe()).user_turn_ids(bpe()) == ()  # "User:" is text
    shared = "{% for m in messages %}<|end|>{{ m.role }}: {{ m.content }}{% endfor %}"  # one token, all roles
    assert ChatFormat.for_tokenizer(tok, shared).user_turn_ids(tok) == ()


def test_a_stored_template_wins_and_may_read_the_special_tokens():
    fmt = ChatFormat.for_tokenizer(
        bpe(), "{{ eos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}"
    )
    assert fmt.render(CHAT[:2]) == "<|endoftext|>[Answer briefly.][What does json.dumps do?]"


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, 3], "messages[1] must be an object"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "text parts"),
    ],
)
def test_bad_messages_are_one_line_naming_the_message(messages, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        check_messages(messages)


def test_developer_is_the_system_role_and_text_parts_join():
    checked = check_messages([{"role": "developer", "content": "be brief"}, CHAT[3]])
    assert checked == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "And loads?"}]


def test_broken_templates_are_user_errors():
    with pytest.raises(UserError, match="not valid Jinja"):
        ChatFormat("{% for m in messages %}").render(CHAT)
    with pytest.raises(UserError, match="no system messages"):
        ChatFormat(
            "{% if messages[0].role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        ).render(CHAT)


def _checkpoint(tmp_path, tok: Tokenizer, template: str | None):
    model = get_model(DeepSeekConfig.from_preset("tiny"))
    return save_model_dir(tmp_path / "ckpt", model, tok, chat_template=template)


def test_checkpoint_keeps_its_chat_template(tmp_path):
    template = "{% for m in messages %}{{ m.role }}> {{ m.content }}\n{% endfor %}"
    assert load_checkpoint(_checkpoint(tmp_path, bpe(), template)).chat_template == template
    assert load_checkpoint(_checkpoint(tmp_path, bpe(), None)).chat_template is None


@pytest.mark.parametrize("role_tokens", [False, True], ids=["plain", "role-tokens"])
def test_export_apply_chat_template_gives_our_ids_and_import_keeps_it(tmp_path, role_tokens):
    transformers = pytest.importorskip("transformers")
    from deepseek_lm.interop import export_hf, import_hf

    tok = bpe(role_tokens)
    ckpt = _checkpoint(tmp_path, tok, None)
    export_hf(ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    fmt = ChatFormat.for_tokenizer(tok)
    ours = tok.encode(fmt.render(CHAT), add_special_tokens=False).ids
    # transformers' templates take string contents: the messages as the server checks them
    theirs = hf_tok.apply_chat_template(check_messages(CHAT), add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert list(theirs) == ours
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert load_checkpoint(tmp_path / "back").chat_template == fmt.template
