"""The fast paths on a CUDA device: skipped without one (CI has none); run on a GPU machine with `-m gpu`.

On CPU the same equalities are tested in fp32 by test_mla / test_moe / test_model; here they are checked with
the GPU kernels (SDPA flash/efficient, cuBLAS, `torch._grouped_mm` in bf16 on Hopper) and under bf16 autocast.
"""

import pytest
import torch
import torch.nn.functional as F

from deepseek_lm.config import DeepSeekConfig
from deepseek_lm.model import get_model, linear_cross_entropy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def model(tiny_config):
    return get_model(tiny_config, device="cuda").eval()


def test_absorbed_cache_decode_equals_naive_fp32(model):
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    cache = model.new_cache(2, 24)
    with torch.no_grad():
        naive = model(ids).logits
        prefill = model(ids[:, :16], cache=cache, start_pos=0).logits
        steps = [model(ids[:, t : t + 1], cache=cache, start_pos=t).logits for t in range(16, 24)]
    got = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(got, naive, atol=1e-4, rtol=0)  # TF32 may be on for cuBLAS


def test_chunked_cross_entropy_bf16_autocast_matches_plain():
    h = torch.randn(512, 64, device="cuda", requires_grad=True)
    w = (torch.randn(8192, 64, device="cuda") * 0.05).requires_grad_()
    y = torch.randint(0, 8192, (512,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, y)
        plain = F.cross_entropy(F.linear(h, w).float(), y)
    g_ours = torch.autograd.grad(ours, (h, w))
    g_plain = torch.autograd.grad(plain, (h, w))
    torch.testing.assert_close(ours, plain, atol=2e-2, rtol=1e-2)
    for a, b in zip(g_ours, g_plain):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=5e-2)


def test_grouped_mm_dispatch_equals_slice_loop_bf16():
    config = DeepSeekConfig.from_preset("tiny", n_routed_experts=8, num_experts_per_tok=2)
    moe = get_model(config, device="cuda").layers[-1].mlp.to(torch.bfloat16)
    x = torch.randn(2, 64, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    outs = []
    for grouped in (True, False):
        moe.experts.use_grouped_mm = grouped
        outs.append(moe(x)[0].float())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)


def test_bf16_training_steps_reduce_the_loss(tiny_config):
    model = get_model(tiny_config, device="cuda").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    ids = torch.randint(0, 512, (4, 33), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], targets=ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_equals_the_model_on_cuda(tiny_config, dtype, compile):
    from deepseek_lm.model.decode import Decoder

    model = get_model(tiny_config, device="cuda").eval().to(dtype)
    ids = torch.randint(0, 512, (3, 12), device="cuda")
    ours, ref = model.new_cache(3, 16), model.new_cache(3, 16)
    with torch.no_grad():
        for cache in (ours, ref):
            model(ids[:, :8], cache=cache, start_pos=0)
        decoder = Decoder(model, 3, compile=compile)
        for t in range(8, 12):
            got = decoder(ids[:, t : t + 1], ours, t).float()
            want = model(ids[:, t : t + 1], cache=ref, start_pos=t).logits[:, -1].float()
            atol = 1e-4 if dtype == torch.float32 else 5e-2  # TF32 / bf16 roundings of other products
            torch.testing.assert_close(got, want, atol=atol, rtol=0)
