"""llama.cpp itself reads our GGUF files: llama-cpp-python (pinned, built from source for this CPU by
`make test`'s set-up) loads them and its logits, greedy ids, tokenisation and chat prompts are compared with
ours. Skipped when llama_cpp is not installed, except in CI (CI=true), where it must run.

llama.cpp runs with its KV cache in f32 (type_k = type_v = GGML_TYPE_F32): its default f16 cache rounds the
latents and moves the logits by ~1e-4 (measured on the demo model), more than the f32 tolerance.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _trained_tiny import trained_tiny_checkpoint

from deepseek_lm.checkpoint import save_model_dir
from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.data.chat import ROLE_TOKENS, TOKEN_CHAT_TEMPLATE, ChatFormat
from deepseek_lm.data.tokenizer import train_bpe
from deepseek_lm.generate import Engine, SamplingConfig
from deepseek_lm.interop import export_gguf
from deepseek_lm.model import get_model
from deepseek_lm.model.mla import make_positions

if os.environ.get("CI", "").lower() in ("1", "true"):
    import llama_cpp  # CI must run these: `make test` installs it
else:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make test`")

GGML_TYPE_F32 = 0
PROMPTS = ["The", "A function that returns the value of", "x = 1\nfor i in range(10):\n", "class Foo"]
# each type's file against our f32 model: the largest logit difference over PROMPTS allowed (about 3x what
# was measured on the trained tiny model: f32 1.7e-6, f16 1.3e-3, bf16 9.2e-3, q8_0 1.9e-2; the README states
# them, with the demo model's)
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2}

# strings chosen to break tokenizers: runs of spaces and newlines, tabs, digits and long numbers, punctuation
# runs, accented and CJK text, emoji (with joiners and modifiers), code, special tokens inside text
TRICKY = [
    "Hello world",
    "  two leading spaces, three trailing   ",
    "a  b   c    d     e",
    "line one\nline two\n\n\nthree newlines\n",
    "\n\n  \n \t\n",
    "tabs\tand\t\tdouble tabs\t",
    "digits 0 12 345 6789 1234567890 3.14159 1e-10 -42 +7",
    "a long number 123456789012345678901234567890 and 2026-12-07T18:35:17Z",
    "punctuation!!! ??? ... --- *** ((( ))) <<<>>> ;;; ::: ,,, !?!?",
    "quotes 'single' \"double\" `back` it's don't we'll I'm you've they're he'd O'Neil",
    "café naïve résumé Ångström über façade São Paulo Œuvre",
    "日本語のテキストと中文文本，还有한국어와 Ελληνικά и русский",
    "emoji 😀👍🏽🎉 a family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✨",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] << 2; }",
    "<|endoftext|> special tokens in text <|pad|><|endoftext|>",
    "mixed\r\nline endings\r\n",
    " ",
    "   \t   ",
    "ends with space ",
    "\u00a0non-breaking\u2003em space",
]


def llama(path: Path, **options) -> llama_cpp.Llama:
    """llama.cpp on one thread, every position's logits kept, its KV cache in f32 (see the docstring)."""
    settings = dict(n_ctx=256, n_threads=1, n_threads_batch=1, logits_all=True, type_k=GGML_TYPE_F32,
                    type_v=GGML_TYPE_F32, verbose=False, seed=0) | options  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        return llama_cpp.Llama(model_path=str(path), **settings)


def llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def our_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_pieces(llm: llama_cpp.Llama, ids: list[int]) -> bytes:
    """The text llama.cpp generates for `ids`: each token's piece, as llama-cli and llama-server print them.
    (`Llama.detokenize` copies at most 32 bytes of a token's text; llama.cpp's `llama_detokenize` also applies
    GPT-2's clean-up of spaces before punctuation, which the gpt-2 pre-tokenizer turns on.)"""
    out, piece = b"", ctypes.create_string_buffer(256)
    for i in ids:
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, i, piece, len(piece), 0, True)
        assert 0 <= n <= len(piece)
        out += piece.raw[:n]
    return out


def llama_greedy(llm: llama_cpp.Llama, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        dtype: export_gguf(trained.path, root / f"tiny-{dtype}.gguf", dtype=dtype).path for dtype in TOLERANCE
    }


# ---------------------------------------------------------------------------------------------------------
# the model


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_logits_equal_ours(trained, files, dtype):
    llm = llama(files[dtype])
    for prompt in PROMPTS:
        ids = trained.tokenizer.encode(prompt, add_special_tokens=False).ids
        diff = np.abs(llama_logits(llm, ids) - our_logits(trained.model, ids)).max()
        assert diff <= TOLERANCE[dtype], (prompt, dtype, diff)


def test_greedy_ids_equal_ours_for_64_tokens(trained, files):
    llm = llama(files["f32"])
    engine = Engine(trained.model, trained.tokenizer)
    engine.eos_token_id = None  # 64 tokens each time: llama.cpp's loop below does not stop at end-of-text
    for prompt in PROMPTS[:3]:
        ids = engine.encode(prompt)
        ours = engine.generate_ids([ids], 64, sampling=SamplingConfig(temperature=0))[0].token_ids
        assert len(ours) == 64
        assert llama_greedy(llm, ids, 64) == ours, prompt


def _context(model, mtp: bool):
    """A raw llama.cpp context: the target's returns the final-normed hidden states (its embeddings), the
    MTP one runs the nextn block (llama-server's `--spec-type draft-mtp` makes the same pair)."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 256
    params.n_threads = params.n_threads_batch = 1
    params.type_k = params.type_v = GGML_TYPE_F32
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.embeddings = not mtp
    if mtp:
        params.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
    return llama_cpp.llama_init_from_model(model, params)


def _decode(ctx, tokens: list[int], states: np.ndarray | None = None) -> None:
    """One batch at positions 0..n-1, every position an output; `states` (n, D): each token's hidden-state
    input (the MTP block's h), carried in the batch's embd beside its token id."""
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
        batch.seq_id[i][0] = 0
    batch.n_tokens = len(tokens)
    if states is not None:
        batch.embd = states.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_decode(ctx, batch) == 0
    batch.embd = None  # ours: llama_batch_free must not free it
    llama_cpp.llama_batch_free(batch)


def test_mtp_block_drafts_as_our_module(files, trained):
    """llama.cpp loads the MTP block (nextn_predict_layers 1) and its MTP graph, fed the target's final-normed
    states h_i and tokens t(i+1), gives our module's logits for t(i+2)."""
    params = llama_cpp.llama_model_default_params()
    params.load_mtp = True
    model = llama_cpp.llama_model_load_from_file(str(files["f32"]).encode(), params)
    assert llama_cpp.llama_model_n_layer_nextn(model) == trained.config.num_nextn_predict_layers == 1
    assert llama_cpp.llama_model_n_layer(model) == trained.config.num_hidden_layers  # the trunk
    target, draft = _context(model, mtp=False), _context(model, mtp=True)
    try:
        ids = trained.tokenizer.encode(PROMPTS[1], add_special_tokens=False).ids
        D, V, n = trained.config.hidden_size, trained.config.vocab_size, len(ids) - 1
        _decode(target, ids)
        h = np.stack(
            [np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(target, i), (D,)) for i in range(n)]
        )
        _decode(draft, ids[1:], np.ascontiguousarray(h, dtype=np.float32))
        theirs = np.stack(
            [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(draft, i), (V,)) for i in range(n)]
        )
        m = trained.model
        with torch.no_grad():
            ours_h = m(torch.tensor([ids]), return_hidden=True).hidden[:, :n]
            pos = make_positions(m.rope, 1, n, 0, False, n)
            ours = m.lm_head(m.mtp[0](ours_h, m.embed_tokens(torch.tensor([ids[1:]])), pos)[0])[0].numpy()
        assert np.abs(h - ours_h[0].numpy()).max() <= 1e-4
        assert np.abs(theirs - ours).max() <= 1e-4
    finally:
        llama_cpp.llama_free(draft)
        llama_cpp.llama_free(target)
        llama_cpp.llama_model_free(model)


@pytest.mark.parametrize(
    "overrides",
    [
        # q_proj without compression, a dense first layer, a tied head, softmax routing with a bias
        dict(q_lora_rank=0, first_k_dense_replace=1, tie_word_embeddings=True, scoring_func="softmax",
             norm_topk_prob=True),
        # DeepSeek-V3's group-limited sigmoid routing, a scaling factor, no renormalisation
        dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5,
             norm_topk_prob=False),
        # YaRN (DeepSeek-V2's mscale), on a prompt that runs past the original context
        dict(rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.707,
                           "mscale_all_dim": 0.707}),
    ],
)  # fmt: skip
def test_architecture_variants_equal_ours(trained, tmp_path, overrides):
    """Untrained models whose weights are scaled up (so the logits spread) and whose biases are nonzero."""
    config = DeepSeekConfig.from_preset(
        "tiny", initializer_range=0.2, vocab_size=trained.config.vocab_size, **overrides
    )
    model = get_model(config).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.3, 0.3)
    ckpt = save_model_dir(tmp_path / "ckpt", model, trained.tokenizer)
    llm = llama(export_gguf(ckpt, tmp_path / "m.gguf").path)
    ids = torch.randint(0, config.vocab_size, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = our_logits(model, ids)
    assert ours.std() > 0.5  # spread enough for the tolerance to mean something
    assert np.abs(llama_logits(llm, ids) - ours).max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------
# the tokenizer


def _tokenizer_corpus() -> list[str]:
    """Text for a BPE that learns merges across every kind of string in TRICKY: some of the standard
    library's own source (code, prose, numbers) and the tricky strings themselves."""
    import json as json_module
    import textwrap

    sources = [Path(m.__file__).read_text(encoding="utf-8") for m in (json_module, textwrap, contextlib)]
    return sources + TRICKY  # once: merges that cross their characters, not whole strings as tokens


def _checkpoint_with(tokenizer, path: Path) -> Path:
    vocab = -(-tokenizer.get_vocab_size() // 64) * 64
    model = get_model(DeepSeekConfig.from_preset("tiny", vocab_size=vocab))
    return save_model_dir(path, model.eval(), tokenizer)


def _smollm_style_bpe(texts: list[str], vocab_size: int):
    """A BPE laid out as SmolLM's / StarCoder's tokenizer.json: digits split one by one, then GPT-2's split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@pytest.mark.parametrize("kind", ["ours", "smollm"])
def test_tokenisation_equals_ours(tmp_path, kind):
    texts = _tokenizer_corpus()
    tokenizer = train_bpe(texts, 1200) if kind == "ours" else _smollm_style_bpe(texts, 1200)
    path = export_gguf(_checkpoint_with(tokenizer, tmp_path / "ckpt"), tmp_path / "t.gguf").path
    llm = llama(path, vocab_only=True)
    for text in TRICKY:
        ours = tokenizer.encode(text, add_special_tokens=False).ids
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert theirs == ours, text
        assert llama_pieces(llm, ours) == tokenizer.decode(ours, skip_special_tokens=False).encode()


def test_hub_tokenizer_llama_cpp_cannot_split_is_one_line(tmp_path):
    """A tokenizer whose pre-tokenizer llama.cpp has no name for (here: whitespace split) is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from deepseek_lm.interop import InteropError

    tokenizer = Tokenizer(models.BPE({"a": 0, "b": 1, "<|endoftext|>": 2}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(InteropError, match="pre-tokenizer \\(Whitespace\\)"):
        export_gguf(_checkpoint_with(tokenizer, tmp_path / "ckpt"), tmp_path / "t.gguf")


# ---------------------------------------------------------------------------------------------------------
# the chat template


@pytest.fixture(scope="module")
def chat_file(trained, tmp_path_factory) -> tuple[Path, object]:
    """The trained tiny model with the role tokens added (as `finetune` adds them) and the role-token
    template: what a fine-tuned chat model exports."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(trained.tokenizer.to_str())
    tokenizer.add_special_tokens(list(ROLE_TOKENS))
    assert tokenizer.get_vocab_size() <= trained.config.vocab_size  # the padded rows hold them
    root = tmp_path_factory.mktemp("chat")
    ckpt = save_model_dir(root / "ckpt", trained.model, tokenizer, chat_template=TOKEN_CHAT_TEMPLATE)
    return export_gguf(ckpt, root / "chat.gguf").path, tokenizer


def test_chat_template_from_the_file_gives_our_ids(chat_file):
    path, tokenizer = chat_file
    llm = llama(path)
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token="",
    )  # what Llama builds from the metadata for create_chat_completion
    fmt = ChatFormat.for_tokenizer(tokenizer, TOKEN_CHAT_TEMPLATE)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And  3 + 3?\n"},
    ]
    prompt = formatter(messages=conversation).prompt
    theirs = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    ours = tokenizer.encode(fmt.render(conversation), add_special_tokens=False).ids
    assert theirs == ours
    assert theirs[-1] == tokenizer.token_to_id("<|assistant|>")


def test_chat_completion_stops_at_end_of_turn_like_ours(chat_file, trained):
    """llama-cpp-python's create_chat_completion (template, stop tokens from the file) against our engine."""
    path, tokenizer = chat_file
    llm = llama(path)
    messages = [{"role": "user", "content": "The"}]
    fmt = ChatFormat.for_tokenizer(tokenizer, TOKEN_CHAT_TEMPLATE)
    engine = Engine(trained.model, tokenizer)
    ours = engine.generate(fmt.render(messages), 24, temperature=0, stop_token_ids=fmt.stop_token_ids)
    theirs = llm.create_chat_completion(messages, max_tokens=24, temperature=0, top_k=1, repeat_penalty=1.0)
    assert theirs["choices"][0]["message"]["content"] == ours.text
