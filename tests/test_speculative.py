"""Self-speculative decoding with the MTP module (generate/speculative.py, model/draft.py): greedy output is
plain greedy output token for token, sampled output has plain sampling's distribution, and the decoder's
verification and draft steps equal the model's own forward."""

import itertools
import random

import pytest
import torch
from _trained_tiny import trained_tiny_run

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.errors import UserError
from deepseek_lm.generate import Engine, SamplingConfig
from deepseek_lm.generate import speculative as spec
from deepseek_lm.generate.sampling import probabilities
from deepseek_lm.model import get_model
from deepseek_lm.model.draft import SpeculativeDecoder
from deepseek_lm.model.mla import make_positions

GREEDY = SamplingConfig(temperature=0.0)
ATOL = 1e-5


def random_model(**overrides) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in): logits of order one, so greedy decoding wanders instead of repeating."""
    config = DeepSeekConfig.from_preset(
        "tiny", **{"num_nextn_predict_layers": 1, "vocab_size": 64, **overrides}
    )
    model = get_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


PROMPTS = [[5, 17, 33, 2, 9], [60, 1, 8, 8, 3, 41, 12, 7, 30], [11]]


def assert_same(plain, speculative):
    for a, b in zip(plain, speculative, strict=True):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        if a.logits is not None:
            torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("draft_tokens", [1, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_speculative_is_plain_greedy(batch, draft_tokens):
    # SwiGLU products through oneDNN (decode._pack), as in the verification of a trained model
    model = random_model(hidden_size=128, moe_intermediate_size=256)
    prompts = PROMPTS[:batch]
    plain = Engine(model).generate_ids(prompts, 30, sampling=GREEDY, output_logits=True)
    engine = Engine(model, speculative=True, draft_tokens=draft_tokens)
    out = engine.generate_ids(prompts, 30, sampling=GREEDY, output_logits=True)
    assert_same(plain, out)
    assert len(set(plain[0].token_ids)) > 5  # a wandering continuation, not a loop
    stats = engine.speculative_stats
    assert stats.drafted == draft_tokens * sum(stats.histogram) and stats.rounds < 30


def oracle_drafts(monkeypatch, plain, vocab: int, wrong: float) -> None:
    """Replace the module's drafts, after it made them, by plain greedy's next tokens, each wrong with
    probability `wrong`: every row then keeps a chosen, varying number of drafts."""
    rng = random.Random(0)

    def oracle(self):
        drafts = self.drafts.clone()
        for b, n in enumerate(self.n.tolist()):
            truth = plain[b].token_ids[n : n + drafts.shape[1]]
            for k, token in enumerate(truth):
                drafts[b, k] = (token + 1) % vocab if rng.random() < wrong else token
        self.drafts = drafts

    for name in ("_first_token", "_round"):  # the two places that leave drafts for the next round
        method = getattr(spec.SpeculativeState, name)

        def wrapped(self, *args, method=method):
            method(self, *args)
            if hasattr(self, "drafts"):
                oracle(self)

        monkeypatch.setattr(spec.SpeculativeState, name, wrapped)


def test_rows_keeping_different_numbers_of_drafts_give_plain_greedy(monkeypatch):
    model, D = random_model(), 3
    plain = Engine(model).generate_ids(PROMPTS, 40, sampling=GREEDY, output_logits=True)
    oracle_drafts(monkeypatch, plain, 64, wrong=0.25)
    engine = Engine(model, speculative=True, draft_tokens=D)
    assert_same(plain, engine.generate_ids(PROMPTS, 40, sampling=GREEDY, output_logits=True))
    histogram = engine.speculative_stats.histogram
    assert all(n > 0 for n in histogram) and histogram[D] > histogram[0]  # 0 .. D kept, mostly all


def test_end_of_the_context_and_rows_ending_mid_round(monkeypatch):
    model = random_model(max_position_embeddings=24)
    prompts = [list(range(1, 13)), [3, 4, 5]]  # 12 + 30 > 24: the first row stops at the context's end
    plain = Engine(model).generate_ids(prompts, 30, sampling=GREEDY)
    assert [c.finish_reason for c in plain] == ["context", "context"]
    oracle_drafts(monkeypatch, plain, 64, wrong=0.0)  # every draft right: rounds run past the end
    assert_same(
        plain, Engine(model, speculative=True, draft_tokens=3).generate_ids(prompts, 30, sampling=GREEDY)
    )


def test_end_of_text_ends_a_row_inside_a_round(monkeypatch):
    model = random_model()
    plain = Engine(model).generate_ids(PROMPTS, 30, sampling=GREEDY)
    engine, reference = Engine(model, speculative=True, draft_tokens=3), Engine(model)
    reference.eos_token_id = engine.eos_token_id = plain[1].token_ids[6]  # row 1 "ends" at its 7th token
    want = reference.generate_ids(PROMPTS, 30, sampling=GREEDY)
    assert want[1].finish_reason == "eos"
    oracle_drafts(monkeypatch, plain, 64, wrong=0.0)  # the end of text arrives among accepted drafts
    assert_same(want, engine.generate_ids(PROMPTS, 30, sampling=GREEDY))


@pytest.mark.slow  # two torch.compile graphs (the greedy round, the first chained draft): ~20 s each on a CPU
def test_compiled_rounds_give_plain_greedy():
    model = random_model()
    plain = Engine(model).generate_ids(PROMPTS[:2], 20, sampling=GREEDY, output_logits=True)
    engine = Engine(model, speculative=True, draft_tokens=2, compile=True)
    assert_same(plain, engine.generate_ids(PROMPTS[:2], 20, sampling=GREEDY, output_logits=True))


def test_draft_and_verification_steps_equal_the_model():
    """The decoder's MTP step = MTPModule's forward over a cache; its verification = the cached forward."""
    model, B, T = random_model(), 2, 4
    prompt, ids = torch.randint(0, 64, (B, 6)), torch.randint(0, 64, (B, T))
    decoder = SpeculativeDecoder(model, B, T)
    cache, ref_cache = model.new_cache(B, 16), model.new_cache(B, 16)
    pos = torch.tensor([6, 3])  # ragged rows: row 1's positions 3.. overwrite its prompt's
    pos_BT = pos[:, None] + torch.arange(T)
    with torch.no_grad():
        for c in (cache, ref_cache):
            model(prompt, cache=c, start_pos=0)
        states = decoder.verify(ids, pos_BT, [kv[:, :10] for kv in cache.kv])
        want = model(ids, cache=ref_cache, start_pos=pos, return_hidden=True).hidden
        torch.testing.assert_close(states, want, atol=ATOL, rtol=0)
        kv, ref_kv = decoder.new_draft_cache(16), decoder.new_draft_cache(16)
        h, tokens = torch.randn(B, 6, 64), torch.randint(0, 64, (B, 6))
        module = model.mtp[0]
        module(h, model.embed_tokens(tokens), make_positions(model.rope, B, 6, 0, True, 16), ref_kv)
        decoder.draft(tokens, h, torch.arange(6).expand(B, 6), kv[:, :6])
        got = decoder.draft(ids, states, pos_BT, kv[:, :10])
        ref, _, _ = module(
            states, model.embed_tokens(ids), make_positions(model.rope, B, T, pos, True, 16), ref_kv
        )
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(kv, ref_kv, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# sampling: the distribution of the first tokens against plain sampling's, enumerated exactly


def exact_distribution(model, prompt: list[int], config: SamplingConfig, n: int) -> torch.Tensor:
    """P(x_1 .. x_n | prompt) under plain sampling with `config`, by enumerating every prefix: (V,) * n."""
    V = model.config.vocab_size
    exact = torch.ones([V] * n)
    with torch.no_grad():
        for k in range(n):
            prefixes = list(itertools.product(range(V), repeat=k))
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]
            p_next = probabilities(logits, config).view([V] * k + [V])
            exact *= p_next.view([V] * (k + 1) + [1] * (n - k - 1))
    return exact


def chi_square(model, prompt, config, n: int, draws: int, draft_tokens: int) -> tuple[float, int]:
    """Pearson's statistic of `draws` speculative samples of n tokens against the exact distribution."""
    exact = exact_distribution(model, prompt, config, n).flatten() * draws
    engine = Engine(model, speculative=True, draft_tokens=draft_tokens)
    engine.eos_token_id = None
    outs = engine.generate_ids([prompt] * draws, n, sampling=config, seed=0)
    V = model.config.vocab_size
    counts = torch.bincount(torch.tensor([sum(t * V**i for i, t in enumerate(reversed(o.token_ids))) for o in outs]),
                            minlength=V**n).double()  # fmt: skip
    assert counts[exact == 0].sum() == 0  # nothing outside the support of top-k / top-p
    cells = exact > 0
    return float(((counts - exact)[cells] ** 2 / exact[cells]).sum()), int(cells.sum()) - 1


def tiny_vocabulary_model() -> torch.nn.Module:
    torch.manual_seed(3)
    model = random_model(vocab_size=5, hidden_size=32, num_hidden_layers=1, q_lora_rank=16, kv_lora_rank=16)
    with torch.no_grad():  # a draft distribution far from the target's, so that many drafts are rejected
        model.mtp[0].eh_proj.weight.mul_(3)
    return model


@pytest.mark.slow  # 4 × 4,000 sampled rows: a few seconds each on 2 cores
@pytest.mark.parametrize(
    "config",
    [SamplingConfig(temperature=1.0, top_k=None), SamplingConfig(temperature=0.7, top_k=4, top_p=0.9)],
)
def test_speculative_sampling_has_plain_samplings_distribution(config, monkeypatch):
    """4,000 samples of the first three tokens (5³ = 125 outcomes) against the enumerated distribution:
    Pearson's χ² stays under its mean + 6 standard deviations (2·dof variance); a wrong residual rule
    (redraw a rejected token from p instead of max(0, p - q)) exceeds the same bound."""
    model = tiny_vocabulary_model()
    stat, dof = chi_square(model, [1, 2, 3], config, n=3, draws=4000, draft_tokens=2)
    bound = dof + 6 * (2 * dof) ** 0.5
    assert stat < bound
    monkeypatch.setattr(spec, "residual", lambda p, q: p)
    wrong, _ = chi_square(model, [1, 2, 3], config, n=3, draws=4000, draft_tokens=2)
    assert wrong > bound


def test_same_seed_same_sample():
    model = random_model()
    engine = Engine(model, speculative=True, draft_tokens=2)
    sampling = SamplingConfig(temperature=1.0, top_k=None)
    a, b, c = (engine.generate_ids(PROMPTS, 20, sampling=sampling, seed=s) for s in (1, 1, 2))
    assert [x.token_ids for x in a] == [x.token_ids for x in b] != [x.token_ids for x in c]


# ---------------------------------------------------------------------------------------------------------
# a trained checkpoint: text, stop strings, end of text; errors


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


def test_trained_model_text_stop_strings_and_streams_match_plain(trained):
    plain, fast = (
        Engine.from_checkpoint(trained),
        Engine.from_checkpoint(trained, speculative=True, draft_tokens=2),
    )
    prompts = ["The", "A function that returns", "the list of"]
    free = plain.generate(prompts[0], max_new_tokens=40, temperature=0)
    stop = free.text[8:12]
    kw = dict(max_new_tokens=40, temperature=0, stop=[stop])
    for a, b in zip(plain.generate(prompts, **kw), fast.generate(prompts, **kw)):
        assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
    pieces = list(fast.stream(prompts[1], max_new_tokens=30, temperature=0))
    assert "".join(pieces) == plain.generate(prompts[1], max_new_tokens=30, temperature=0).text
    assert fast.speculative_stats.accepted > 0  # a trained module drafts some tokens right


def test_model_without_mtp_and_unsupported_settings_are_one_line_errors(tmp_path):
    from deepseek_lm.checkpoint import save_model_dir
    from deepseek_lm.generate.cli import main_generate

    model = get_model(DeepSeekConfig.from_preset("tiny"))
    with pytest.raises(UserError, match="num_nextn_predict_layers"):
        Engine(model, speculative=True)
    ckpt = save_model_dir(tmp_path / "ckpt", model)
    with pytest.raises(UserError, match=r"--speculative: .*has no MTP modules") as info:
        main_generate(["--checkpoint", str(ckpt), "--prompt", "x", "--speculative"])
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="repetition"):
        Engine(random_model(), speculative=True).generate_ids(
            [[1]], 3, sampling=SamplingConfig(repetition_penalty=1.2)
        )
