"""`deepseek-lm rl` (rl/): a tiny model learns a trivially rewarded behaviour (and not a shuffled one), resume
is exact, broken rewards are one line and lose nothing, rollouts equal `generate` with the policy's current
weights, and the built-in tasks' prompts and checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _trained_tiny import trained_tiny_run

from deepseek_lm.checkpoint import latest_checkpoint, load_checkpoint, read_model_state, read_trainer_state
from deepseek_lm.cli import main
from deepseek_lm.data.chat import ChatFormat
from deepseek_lm.data.tasks import arithmetic_rows, task_rows
from deepseek_lm.errors import UserError
from deepseek_lm.generate import Engine
from deepseek_lm.rl import RL_DEFAULTS, RLConfig, rl
from deepseek_lm.rl.objective import GRPO
from deepseek_lm.rl.rewards import (
    arithmetic_reward,
    functions_reward,
    load_reward,
    module_reward,
    signature_reward,
)
from deepseek_lm.rl.rollout import Rollouts, completion_seed
from deepseek_lm.train.finetune import chat_tokenizer
from deepseek_lm.train.monitor import read_metrics

QUESTIONS = [
    "what is the data?",
    "what does the module return?",
    "the class of the file?",
    "a list of the error?",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"{q} {i}", "answer": "list"} for i in range(10) for q in QUESTIONS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rl_config(**overrides) -> RLConfig:
    settings = dict(
        seq_len=64, max_new_tokens=6, group_size=8, prompts_per_step=4, max_steps=20, max_time_minutes=None,
        lr=3e-3, eval_every=10, save_every=10, log_every=1, peak_flops=1e12, eval_prompts=8,
        sample_prompts=["what is the data?"], sample_max_new_tokens=6,
    )  # fmt: skip
    return RLConfig.from_dict({**RLConfig().to_dict(), **RL_DEFAULTS, **settings, **overrides})


def mean_reward(records: list[dict]) -> float:
    return sum(r["reward"] for r in records) / len(records)


def test_a_tiny_model_learns_a_trivial_reward_and_not_a_shuffled_one(base, prompts, tmp_path, monkeypatch):
    rl(base, rl_config(), tmp_path / "true", prompts=prompts, reward="rl_rewards:says_list")
    learned = read_metrics(tmp_path / "true", "train")
    score = GRPO.score

    def shuffled(self, rows, completions):  # the same rewards, given to other completions
        rewards = score(self, rows, completions)
        order = torch.randperm(
            len(rewards), generator=torch.Generator().manual_seed(len(rewards) + rows[0]["ids"][-2])
        )
        return [rewards[i] for i in order]

    monkeypatch.setattr(GRPO, "score", shuffled)
    rl(base, rl_config(), tmp_path / "shuffled", prompts=prompts, reward="rl_rewards:says_list")
    unlearned = read_metrics(tmp_path / "shuffled", "train")
    first, last = mean_reward(learned[:4]), mean_reward(learned[-4:])
    assert first < 0.5 and last > 0.8 and last > first + 0.4
    assert mean_reward(unlearned[-4:]) < first + 0.25
    evals = read_metrics(tmp_path / "true", "eval")
    assert evals[0]["step"] == 0 and evals[-1]["reward"] == 1.0  # greedy held-out replies say "list" too
    record = learned[-1]
    for key in ("reward_std", "kl", "clipped", "length", "entropy", "flat_groups", "completions_per_s"):
        assert key in record
    assert (
        (tmp_path / "true" / "reward.png").is_file()
        and (tmp_path / "true" / "expert_load.png").is_file()
        and (tmp_path / "true" / "reference").is_dir()
    )


def test_n_steps_then_resume_m_equals_n_plus_m(base, prompts, tmp_path):
    cfg = rl_config(max_steps=4, eval_every=0, save_every=2, updates_per_batch=2)  # μ 2: the ratio and clip
    rl(base, cfg, tmp_path / "straight", prompts=prompts, reward="rl_rewards:says_list")
    rl(base, cfg, tmp_path / "split", prompts=prompts, reward="rl_rewards:says_list", stop_at_step=2)
    rl(None, cfg, tmp_path / "split", prompts=prompts, reward="rl_rewards:says_list", resume=True)
    a, b = (latest_checkpoint(tmp_path / run) for run in ("straight", "split"))
    assert a.name == b.name == "step_00000004"
    sa, sb = read_model_state(a), read_model_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert read_trainer_state(a)["loader"] == read_trainer_state(b)["loader"]
    timing = {
        "step_time_s",
        "completions_per_s",
        "tokens_per_s",
        "rollout_s",
        "update_s",
        "cpu_percent",
        "rss_gb",
        "mfu",
    }
    ra, rb = ([{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / run, "train")]
              for run in ("straight", "split"))  # fmt: skip
    assert ra == rb


@pytest.mark.parametrize(
    "name, says",
    [
        ("raises", "raised ZeroDivisionError"),
        ("returns_nan", "returned nan"),
        ("returns_text", "returned '1.0' (str)"),
    ],
)
def test_a_broken_reward_is_one_line_naming_it_and_the_prompt(base, prompts, tmp_path, capsys, name, says):
    argv = ["rl", "--checkpoint", str(base), "--out", str(tmp_path / "run"), "--prompts", str(prompts),
            "--reward", f"rl_rewards:{name}", "--train.seq_len", "64",
            "--train.max_new_tokens", "4"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"reward rl_rewards:{name} on the prompt '" in err and says in err
    assert "(train.jsonl:" in err or "(val.jsonl:" in err or "prompts.jsonl:" in err


def test_a_reward_that_fails_mid_run_keeps_what_was_trained(base, prompts, tmp_path):
    import rl_rewards

    rl_rewards.calls["n"] = 0
    says = r"reward rl_rewards:fails_later on the prompt .* raised ValueError: the grader went away; saved "
    with pytest.raises(UserError, match=says + r".*step_0000000[1-9]"):
        rl(base, rl_config(eval_every=0, save_every=0), tmp_path / "run", prompts=prompts,
           reward="rl_rewards:fails_later")  # fmt: skip
    saved = latest_checkpoint(tmp_path / "run")
    state = read_trainer_state(saved)
    assert state["state"]["step"] >= 1 and state["loader"]["drawn"] == 4 * state["state"]["step"]


def test_reward_specs_and_resume_refuse_what_does_not_fit(base, prompts, tmp_path):
    with pytest.raises(UserError, match="cannot import no_such_module"):
        load_reward("no_such_module:f")
    with pytest.raises(UserError, match="has no function nope"):
        load_reward("rl_rewards:nope")
    with pytest.raises(UserError, match="expected module:function"):
        load_reward("rl_rewards")
    assert load_reward(str(Path(__file__).parent / "rl_rewards.py") + ":says_list")(None, "a list") == 1.0
    with pytest.raises(UserError, match="have no built-in reward: give --reward"):
        rl(base, rl_config(), tmp_path / "none", prompts=prompts)
    rl(
        base,
        rl_config(max_steps=1, eval_every=0),
        tmp_path / "run",
        prompts=prompts,
        reward="rl_rewards:says_list",
    )
    with pytest.raises(UserError, match="trained with --reward rl_rewards:says_list: resume with the same"):
        rl(None, rl_config(max_steps=2), tmp_path / "run", resume=True, reward="rl_rewards:raises")


def test_rollouts_see_the_current_weights_and_equal_generate(base):
    """The batch engine's samples equal `Engine.generate` with each completion's seed, before and after the
    weights change in place (as an optimizer step changes them)."""
    ckpt = load_checkpoint(base)
    tokenizer, template = chat_tokenizer(ckpt)
    fmt = ChatFormat.for_tokenizer(tokenizer, template)
    model = ckpt.model.train()
    prompts = [tokenizer.encode(fmt.render([{"role": "user", "content": q}])).ids for q in QUESTIONS]
    seeds = [completion_seed(1337, 3, i) for i in range(len(prompts))]
    rollouts = Rollouts(model, ckpt.tokenizer, fmt, slots=2, context=64)
    try:
        before = rollouts.sample(prompts, 8, 1.0, seeds)
        with torch.no_grad():
            model.lm_head.weight.mul_(3.0)  # in place: the version counter moves, as under an optimizer step
        after = rollouts.sample(prompts, 8, 1.0, seeds)
    finally:
        rollouts.close()
    assert model.training  # handed back in training mode
    engine = Engine(model, ckpt.tokenizer)
    for ids, seed, got in zip(prompts, seeds, after):
        want = engine.generate_ids(
            [ids], 8, sampling=rollouts_sampling(), seed=seed, stop_token_ids=fmt.stop_token_ids
        )[0]
        assert got.token_ids[: len(want.token_ids)] == want.token_ids and got.text == want.text
    assert [c.token_ids for c in before] != [c.token_ids for c in after]


def rollouts_sampling():
    from deepseek_lm.generate.sampling import SamplingConfig

    return SamplingConfig(temperature=1.0, top_k=None, top_p=1.0)


def test_built_in_rewards():
    assert module_reward(None, "`dumps` is in the `json` module.", "`dumps` is in the `json` module.") == 1.0
    assert module_reward(None, "json", "`dumps` is in the `json` module.") == 1.0
    assert (
        module_reward(None, "`dumps` is in the `pickle` module.", "`dumps` is in the `json` module.") == 0.0
    )
    assert signature_reward(None, " json.dumps(obj) ", "`json.dumps(obj)`") == 1.0
    assert signature_reward(None, "`json.dumps(obj, x)`", "`json.dumps(obj)`") == 0.0
    ref = "`a`, `b`, `c` and `d`."
    assert functions_reward(None, ref, ref) == 1.0
    assert functions_reward(None, "`a`, `b` and `x`.", ref) == pytest.approx(
        2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    )
    assert functions_reward(None, "nothing", ref) == 0.0
    assert arithmetic_reward(None, " 42\n", "42") == 1.0 and arithmetic_reward(None, "42.", "42") == 0.0


def test_built_in_tasks_keep_their_held_out_splits():
    train, val = arithmetic_rows("train"), arithmetic_rows("val")
    keys = lambda rows: {r["source"] for r in rows}  # noqa: E731
    assert not keys(train) & keys(val) and 0.07 < len(val) / (len(train) + len(val)) < 0.13
    row = train[0]
    a, op, b = row["source"].split(":")[1].split()
    assert row["fields"]["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
    assert row["messages"][-1]["role"] == "user" and a in row["prompt"]

    def conv(key, question, answer):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return {"id": key, "source": "val.jsonl:1", "messages": messages}

    class Chat:  # a prepared chat directory's conversations (data/instructions.py's ids)
        def conversations(self, split):
            return [
                conv(
                    "json.dumps:where", "Which module provides `dumps`?", "`dumps` is in the `json` module."
                ),
                conv("json.dumps:args", "How do I call `json.dumps`?", "`json.dumps(obj)`"),
            ]

    rows = task_rows("module", "val", Chat())
    assert len(rows) == 1 and rows[0]["fields"] == {"answer": "`dumps` is in the `json` module."}
    assert task_rows("signature", "train", Chat())[0]["prompt"] == "How do I call `json.dumps`?"


def test_finetune_task_trains_on_the_tasks_answers_without_their_held_out_part(tmp_path):
    from deepseek_lm.data.chat_data import ChatPrepareConfig, prepare_chat

    chat = prepare_chat(ChatPrepareConfig(tasks=["arithmetic"], out=str(tmp_path / "data")))
    train, val = chat.conversations("train"), chat.conversations("val")
    assert len(val) == len(arithmetic_rows("val")) and len(train) == len(arithmetic_rows("train"))
    held_out = {c["messages"][0]["content"] for c in val}
    assert not held_out & {c["messages"][0]["content"] for c in train}
    assert all(c["messages"][-1]["role"] == "assistant" for c in train)


def test_rl_cli_help_names_the_grpo_settings(capsys):
    assert main(["rl", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--train.group_size", "--train.clip_range", "--train.kl_weight", "--train.temperature",
                 "--train.updates_per_batch", "--reward", "--prompts", "--task"):  # fmt: skip
        assert flag in out


def test_the_recipe_through_the_cli_sft_on_the_task_then_rl(base, tmp_path, capsys):
    """`finetune --task arithmetic`, then `rl --task arithmetic`, as the README runs them (a few steps)."""
    sft, out = tmp_path / "sft", tmp_path / "rl"
    short = ["--max-steps", "2", "--train.seq_len", "64", "--train.peak_flops", "1e12"]
    assert main(["finetune", "--checkpoint", str(base), "--task", "arithmetic", "--out", str(sft), *short,
                 "--train.eval_batches", "1"]) == 0  # fmt: skip
    assert main(["rl", "--checkpoint", str(sft), "--task", "arithmetic", "--out", str(out), *short,
                 "--train.max_new_tokens", "4", "--train.eval_prompts", "4"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "built-in tasks: arithmetic" in printed and "final held-out reward" in printed
    evals = read_metrics(out, "eval")
    assert evals[0]["prompts_arithmetic"] == evals[-1]["prompts_arithmetic"] == len(arithmetic_rows("val"))
    assert {"reward_arithmetic", "exact_arithmetic"} <= set(evals[-1])
