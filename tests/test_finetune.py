"""Fine-tuning on conversations (train/finetune.py and its CLI), chatting with the result (generate --chat),
its evaluation, and its Hugging Face export: a tiny model, pretrained a few dozen steps, learns a toy set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _trained_tiny import trained_tiny_run

from deepseek_lm.checkpoint import load_checkpoint, read_model_state
from deepseek_lm.cli import main
from deepseek_lm.data.chat import ChatFormat, check_messages
from deepseek_lm.data.chat_data import ChatPrepareConfig
from deepseek_lm.generate import Engine
from deepseek_lm.generate.sampling import SamplingConfig
from deepseek_lm.train.config import TrainConfig
from deepseek_lm.train.finetune import FINETUNE_DEFAULTS, finetune, grow_vocab
from deepseek_lm.train.monitor import read_metrics

# words the tiny tokenizer knows (tests/train_helpers.py)
TOY = {
    "what does the module return?": "the module returns a list of data.",
    "what is the class?": "a class of the file object.",
    "what does the method do?": "the method returns the string value.",
    "what is the error?": "an error of the number.",
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


def toy_file(path: Path, copies: int = 10, extra: list[str] = ()) -> Path:
    rows = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for _ in range(copies)
        for q, a in TOY.items()
    ]
    path.write_text("\n".join([*rows, *extra]) + "\n")
    return path


def toy_config(**overrides) -> TrainConfig:
    settings = dict(
        seq_len=64, micro_batch_size=4, lr=6e-3, warmup_steps=5, max_steps=60, eval_every=30, eval_batches=2,
        save_every=30, sample_every=0, sample_max_new_tokens=12, peak_flops=1e12, log_every=5,
        max_time_minutes=None, schedule_by_time=False,
    )  # fmt: skip
    return TrainConfig.from_dict({**TrainConfig().to_dict(), **FINETUNE_DEFAULTS, **settings, **overrides})


@pytest.fixture(scope="module")
def toy_run(base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    data = ChatPrepareConfig(data=[str(toy_file(root / "toy.jsonl"))])
    finetune(base, toy_config(), root / "run", data=data)
    return root / "run"


def test_new_rows_are_the_mean_and_the_base_model_is_unchanged_on_its_own_tokens(base):
    ckpt = load_checkpoint(base)
    known = ckpt.tokenizer.get_vocab_size()
    config, state = grow_vocab(ckpt.config, ckpt.model.state_dict(), known, known + 4, 64)
    assert config.vocab_size == 320 and ckpt.config.vocab_size == 320  # 300 + 4 tokens fit the padding...
    config, state = grow_vocab(ckpt.config, ckpt.model.state_dict(), known, known + 30, 64)
    assert config.vocab_size == 384  # ... 330 do not
    for key in ("embed_tokens.weight", "lm_head.weight"):
        old, new = ckpt.model.state_dict()[key], state[key]
        assert torch.equal(new[:known], old[:known])
        torch.testing.assert_close(new[known:], old[:known].mean(0).expand(384 - known, -1))
    from deepseek_lm.model import get_model

    grown = get_model(config)
    grown.load_state_dict(state)
    x = torch.randint(0, known, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(grown.eval()(x).logits[..., :known], ckpt.model(x).logits[..., :known])


def test_a_tiny_model_memorises_the_toy_answers_and_stops_at_its_end_token(toy_run):
    ckpt = load_checkpoint(toy_run)
    fmt = ChatFormat.for_tokenizer(ckpt.tokenizer, ckpt.chat_template)
    end = ckpt.tokenizer.token_to_id("<|end|>")
    assert (
        fmt.stop_token_ids == (end,)
        and ckpt.chat_template == (toy_run / "latest" / "chat_template.jinja").read_text()
    )
    engine = Engine(ckpt.model, ckpt.tokenizer)
    prompts = [fmt.render([{"role": "user", "content": q}]) for q in TOY]
    outs = engine.generate(prompts, max_new_tokens=16, temperature=0, stop_token_ids=fmt.stop_token_ids)
    assert [o.text for o in outs] == list(TOY.values())
    assert {o.finish_reason for o in outs} == {"eos"}
    # without the stop token the reply runs past it: the engine stops only where asked
    longer = engine.generate(prompts[0], max_new_tokens=16, temperature=0)
    assert end in longer.token_ids and longer.finish_reason != "eos"


def test_metrics_start_from_the_base_models_answer_loss_and_score_answers_only(toy_run):
    evals = read_metrics(toy_run, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["loss"] < 0.3 * evals[0]["loss"]
    # the held-out answers: 2 conversations' answer tokens (their content and end token), nothing else
    ckpt = load_checkpoint(toy_run)
    val = [json.loads(line) for line in (toy_run / "data" / "val.jsonl").read_text().splitlines()]
    answers = [m["content"] for c in val for m in c["messages"] if m["role"] == "assistant"]
    expected = sum(len(ckpt.tokenizer.encode(a, add_special_tokens=False).ids) + 1 for a in answers)
    assert evals[-1]["tokens"] == expected
    from deepseek_lm.generate.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(ckpt)  # its own held-out conversations, in wider windows: the same losses
    assert report.tokens == expected and report.loss == pytest.approx(evals[-1]["loss"], rel=1e-5, abs=1e-6)


def test_finetune_resume_is_exact(base, tmp_path):
    data = ChatPrepareConfig(data=[str(toy_file(tmp_path / "toy.jsonl"))])
    cfg = toy_config(max_steps=6, eval_every=3, save_every=3, seq_len=32, micro_batch_size=2, log_every=1)
    finetune(base, cfg, tmp_path / "whole", data=data)
    finetune(base, cfg, tmp_path / "parts", data=data, stop_at_step=3)
    saved = json.loads((tmp_path / "parts" / "latest" / "config.json").read_text())["train"]
    finetune(None, TrainConfig.from_dict(saved), tmp_path / "parts", resume=True)
    whole, parts = (read_model_state(tmp_path / d / "latest") for d in ("whole", "parts"))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    losses = [[r["loss"] for r in read_metrics(tmp_path / d, "train")] for d in ("whole", "parts")]
    assert losses[0] == losses[1]


def test_export_gives_transformers_our_chat_ids_and_stops_its_generate_at_the_end_token(toy_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from deepseek_lm.interop import export_hf

    export_hf(toy_run, tmp_path / "hf")
    ckpt = load_checkpoint(toy_run)
    fmt = ChatFormat.for_tokenizer(ckpt.tokenizer, ckpt.chat_template)
    chat = [
        {"role": "system", "content": "the data."},
        {"role": "user", "content": "what is the class?"},
        {"role": "assistant", "content": "a class of the file object."},
        {"role": "user", "content": "what is the error?"},
    ]
    ours = ckpt.tokenizer.encode(fmt.render(chat), add_special_tokens=False).ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    theirs = hf_tok.apply_chat_template(check_messages(chat), add_generation_prompt=True, tokenize=True)
    assert list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ours
    end = ckpt.tokenizer.token_to_id("<|end|>")
    assert end in json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"]
    # transformers' greedy reply: ours, ended by the end-of-turn token (generation_config's eos list)
    prompt = ckpt.tokenizer.encode(fmt.render(chat[-1:]), add_special_tokens=False).ids
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[
        0, len(prompt) :
    ].tolist()
    greedy = SamplingConfig(temperature=0.0)
    (mine,) = Engine(ckpt.model, ckpt.tokenizer).generate_ids(
        [prompt], 16, sampling=greedy, stop_token_ids=fmt.stop_token_ids
    )
    assert (
        out == [*mine.token_ids, end]
        and hf_tok.decode(out, skip_special_tokens=True) == TOY[chat[-1]["content"]]
    )


def test_chat_loop_keeps_history_and_forgets_it_on_reset(toy_run, capsys):
    from deepseek_lm.generate.chat import chat_format, chat_loop, fit_history

    engine = Engine.from_checkpoint(toy_run)
    fmt = chat_format(engine, load_checkpoint(toy_run).chat_template)
    lines = iter(["what is the error?", "what is the class?", "/reset", "what does the method do?"])
    prompts, generate = [], engine.generate
    engine.generate = lambda prompt, **kw: prompts.append(prompt) or generate(prompt, **kw)

    def read(_: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    history = chat_loop(engine, fmt, dict(max_new_tokens=16, temperature=0.0), read=read)
    replies = capsys.readouterr().out.splitlines()
    assert history == [
        {"role": "user", "content": "what does the method do?"},
        {"role": "assistant", "content": TOY["what does the method do?"]},
    ]
    assert replies[0] == TOY["what is the error?"] and replies[2] == TOY["what does the method do?"]
    # the second question came after the first exchange; after /reset the history was empty again
    assert prompts[1] == fmt.render(
        [{"role": "user", "content": "what is the error?"}, {"role": "assistant", "content": replies[0]},
         {"role": "user", "content": "what is the class?"}]
    ) and prompts[2] == fmt.render([{"role": "user", "content": "what does the method do?"}])  # fmt: skip
    # a history longer than the context loses its oldest exchanges, never the system message
    engine.context_length = 48
    long = [{"role": "system", "content": "the data."}] + [
        {"role": r, "content": "the data of the file object."} for r in ["user", "assistant"] * 4
    ]
    prompt = fit_history(engine, fmt, [*long, {"role": "user", "content": "what is the error?"}], 16)
    assert prompt.startswith("<|system|>the data.<|end|><|user|>") and prompt.endswith(
        "error?<|end|><|assistant|>"
    )
    assert len(engine.encode(prompt)) <= 32 and prompt.count("<|user|>") < 5


def test_finetune_cli_names_bad_lines_then_chats_and_evaluates(base, tmp_path, capsys):
    bad = ["{not json", json.dumps({"messages": [{"role": "user", "content": "no answer"}]})]
    data = toy_file(tmp_path / "chats.jsonl", copies=2, extra=bad)
    out = tmp_path / "run"
    argv = ["finetune", "--checkpoint", str(base), "--data", str(data), "--out", str(out), "--max-steps", "2"]
    argv += ["--train.seq_len", "32", "--train.micro_batch_size", "2", "--train.peak_flops", "1e12"]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if ":9: skipped: not valid JSON" in line] != []
    assert [line for line in err if ":10: skipped: no assistant message" in line] != []
    assert [line for line in err if "skipped 2 of 10 lines" in line] != []
    assert main(["generate", "--checkpoint", str(out), "--chat", "--prompt", "what is the class?",
                 "--temperature", "0", "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() != ""
    assert main(["eval", "--checkpoint", str(out)]) == 0
    assert "answers only" in capsys.readouterr().out


def test_an_offline_dataset_fails_at_once_with_one_line(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["finetune", "--checkpoint", str(base), "--dataset", "someone/chats", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--dataset someone/chats" in line and "offline" in line
    assert not os.path.exists(tmp_path / "r" / "checkpoints")


def test_serve_answers_in_the_fine_tuned_chat_format_and_ends_at_its_end_token(toy_run):
    from serve_helpers import LiveServer

    live = LiveServer(load_checkpoint(toy_run), max_batch_size=2)
    try:
        for question, answer in list(TOY.items())[:2]:
            out = live.client().chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=32
            )
            assert out.choices[0].message.content == answer and out.choices[0].finish_reason == "stop"
    finally:
        live.stop()
