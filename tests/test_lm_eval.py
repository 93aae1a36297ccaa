"""lm-evaluation-harness as a client of the server: its `local-completions` backend against `deepseek-lm
serve` gives the log-likelihoods and the accuracy of its `hf` backend on our HF export of the same
checkpoint, on tasks defined here over data the test writes (no Hub: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE).

What lm-eval 0.4.13 sends: GET /tokenizer_info (our 404 makes it tokenize with the HF tokenizer named in
its arguments, our export's), then POST /v1/completions with 8 token-id prompts, max_tokens 1, logprobs 1,
echo, temperature 0; it sums token_logprobs over the continuation's tokens by its own tokenization, so the
server must score exactly the tokens it is sent."""

import json
import random

import pytest
from _trained_tiny import trained_tiny_checkpoint, trained_tiny_run
from serve_helpers import LiveServer

N_DOCS = 24  # multiple-choice questions (4 choices each: 96 log-likelihoods per backend)


def _questions(tmp_path) -> list[dict]:
    """Multiple choice from the held-out instruction set: which module provides a name (the model saw
    neither the questions nor these modules' docstrings), the other choices other questions' answers."""
    from deepseek_lm.data.instructions import instruction_set

    held_out = [e["messages"] for e in instruction_set()["val"] if len(e["messages"]) == 2]
    pairs = [(m[0]["content"], m[1]["content"]) for m in held_out if len(m[1]["content"]) < 60]
    rng = random.Random(0)
    rng.shuffle(pairs)
    answers = [a for _, a in pairs]
    docs = []
    for question, answer in pairs[:N_DOCS]:
        wrong = rng.sample([a for a in answers if a != answer], 3)
        label = rng.randrange(4)
        docs.append(dict(question=question, choices=[*wrong[:label], answer, *wrong[label:]], label=label))
    return docs


def _tasks(tmp_path) -> str:
    docs = _questions(tmp_path)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "mc.yaml").write_text(
        "task: deepseek_lm_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "User: {{question}}\\nAssistant:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
    )
    (tmp_path / "gen.yaml").write_text(
        "task: deepseek_lm_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "User: {{question}}\\nAssistant:"\ndoc_to_target: "{{choices[label]}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return str(tmp_path)


def _evaluate(model: str, model_args: dict, tasks_dir: str, task: str, limit: int | None = None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], task_manager=TaskManager(include_path=tasks_dir),
        log_samples=True, limit=limit, batch_size=1, random_seed=0, numpy_random_seed=0,
        torch_random_seed=0, fewshot_random_seed=0,
    )  # fmt: skip


def _by_doc(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow
def test_lm_eval_through_the_server_equals_its_hf_backend_on_our_export(
    tmp_path, tmp_path_factory, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from deepseek_lm.interop.hf import export_hf

    hf_dir = tmp_path / "hf"
    export_hf(trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run"), hf_dir)
    tasks_dir = _tasks(tmp_path)
    hf_args = dict(pretrained=str(hf_dir), dtype="float32", device="cpu", max_length=256)
    live = LiveServer(trained_tiny_checkpoint(tmp_path_factory), max_batch_size=8, max_queue=16)
    try:
        ours_args = dict(
            model="tiny", base_url=f"{live.url}/v1/completions", tokenizer=str(hf_dir), max_length=256,
            num_concurrent=1, max_retries=1,
        )  # fmt: skip
        ours = _evaluate("local-completions", ours_args, tasks_dir, "deepseek_lm_mc")
        ours_gen = _evaluate("local-completions", ours_args, tasks_dir, "deepseek_lm_gen", limit=8)
    finally:
        live.stop()
    hf = _evaluate("hf", hf_args, tasks_dir, "deepseek_lm_mc")
    hf_gen = _evaluate("hf", hf_args, tasks_dir, "deepseek_lm_gen", limit=8)

    ours_ll, hf_ll = _by_doc(ours, "deepseek_lm_mc"), _by_doc(hf, "deepseek_lm_mc")
    assert len(ours_ll) == N_DOCS and all(len(r) == 4 for r in ours_ll)
    for mine, theirs in zip(ours_ll, hf_ll):
        for (a, greedy_a), (b, greedy_b) in zip((r[0] for r in mine), (r[0] for r in theirs)):
            assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    acc = ours["results"]["deepseek_lm_mc"]["acc,none"]
    assert acc == hf["results"]["deepseek_lm_mc"]["acc,none"]
    generations = _by_doc(ours_gen, "deepseek_lm_gen")
    assert len(generations) == 8 and any(g[0][0].strip() for g in generations)
    assert generations == _by_doc(hf_gen, "deepseek_lm_gen")  # greedy: the same text
