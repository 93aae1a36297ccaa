"""Expert parallelism on CPU (gloo): an EP group equals one process holding the group's batch (loss, logits,
router statistics, every gradient), under DDP and FSDP2, with and without replicas; a process that dies in
the middle of a dispatch ends the others with the one-line "lost contact" message.

The processes run this file as a script (`python tests/test_expert_parallel.py WORKER`), started by hand
with torchrun's environment variables, as test_distributed.py's dead-rank test does.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

# fp32 sums in another order than one process (the losses' mean, DDP's all-reduce, the split norm): observed
# ≤ 1e-6 on the loss, ≤ 3e-8 on gradients, 0 on logits
ATOL, RTOL = 1e-5, 1e-4
# model overrides of the tiny preset (4 routed experts, top-2) per case
CASES = {
    "dropless": {},
    "capacity": dict(capacity_factor=0.6),
    "capacity-slice-loop": dict(capacity_factor=0.6, scoring_func="softmax", n_group=2, topk_group=1),
    "grad-checkpointing": {},
    "one-process-gets-nothing": {},  # every token picks experts 0 and 1: the second EP process idles
}


def launch(
    worker: str, world_size: int, *args: str, timeout: float = 240
) -> list[subprocess.CompletedProcess]:
    """Run `worker` in `world_size` processes with torchrun's environment; their completed processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank)}  # fmt: skip
        argv = [sys.executable, __file__, worker, *args]
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _equality_report(world_size: int, ep_size: int, cases: list[str], wraps: list[str]) -> dict:
    procs = launch("equality", world_size, str(ep_size), ",".join(cases), ",".join(wraps))
    for p in procs:
        assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads(procs[0].stdout.strip().splitlines()[-1])
    assert set(report) == {f"{case}/{wrap}" for case in cases for wrap in wraps}
    # each process routes its own tokens: the counts add up to one process's, dropping is the group's
    assert all(r["counts_equal"] and r["dropped_equal"] for r in report.values()), report
    return report


def test_expert_parallel_equals_one_process_with_the_same_batch():
    report = _equality_report(2, 2, list(CASES), ["ddp", "fsdp"])
    assert report["capacity/ddp"]["dropped"] > 0.05 and report["dropless/ddp"]["dropped"] == 0


def test_expert_parallel_with_replicas():
    # 4 processes = 2 EP groups of 2: expert gradients summed over the replicas (DDP) or reduce-scattered
    # over them (FSDP2); capacity is each group's, as one process holding that group's batch
    report = _equality_report(4, 2, ["capacity", "one-process-gets-nothing"], ["ddp", "fsdp"])
    assert report["capacity/fsdp"]["dropped"] > 0.05


def test_a_process_dying_mid_dispatch_ends_the_others(tmp_path):
    from train_helpers import make_tiny_data

    (tmp_path / "data").mkdir()
    data_dir = make_tiny_data(tmp_path / "data")
    start = time.monotonic()
    procs = launch("die_mid_dispatch", 2, str(data_dir), str(tmp_path / "run"), timeout=120)
    assert procs[1].returncode == 17  # died in its second all-to-all: the first layer's combine
    assert procs[0].returncode not in (0, None)
    last_line = procs[0].stderr.strip().splitlines()[-1]
    assert last_line.startswith("deepseek-lm train: error: rank 0: lost contact with the other processes")
    assert last_line.endswith("restart the run with --resume")
    assert time.monotonic() - start < 100  # gloo reports the closed connection at once; no hang


@pytest.mark.parametrize(
    "size, world, experts, moe_layers, precision, problem",
    [
        (2, 1, 4, 2, "fp32", "needs torchrun with several processes"),
        (3, 4, 6, 2, "fp32", "must divide the number of processes (4)"),
        (4, 4, 6, 2, "fp32", "must divide n_routed_experts (6)"),
        (2, 2, 4, 0, "fp32", "no MoE layer"),
        (2, 2, 4, 2, "fp16", "needs precision bf16 or fp32"),
    ],
)
def test_settings_that_cannot_work_are_refused_in_one_line(
    size, world, experts, moe_layers, precision, problem
):
    from deepseek_lm.errors import UserError
    from deepseek_lm.train import expert_parallel as EP

    with pytest.raises(UserError, match=re.escape(problem)) as e:
        EP.setup(size, world, experts, moe_layers, precision, 60)
    message = str(e.value)
    assert message.startswith(f"train.expert_parallel {size} ") and "--train.expert_parallel 1" in message


def test_a_sharded_model_keeps_its_slice_and_counts_every_expert():
    from deepseek_lm.config import DeepSeekConfig
    from deepseek_lm.model import get_model
    from deepseek_lm.model.expert_parallel import ExpertShard
    from deepseek_lm.train import expert_parallel as EP

    model = get_model(DeepSeekConfig.from_preset("tiny"))
    counts, full = model.param_counts(), [m.experts.down_proj.detach().clone() for m in model.moe_layers()]
    EP.shard_experts(model, EP.ExpertParallel(ExpertShard(None, rank=1, size=2), None, 2))  # no collective
    assert [n for n, _ in EP.routed_parameters(model)] == [
        f"layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")
    ]
    for moe, weight in zip(model.moe_layers(), full):
        assert torch.equal(moe.experts.down_proj, weight[2:])  # experts 2 and 3 of 4
    assert model.param_counts() == counts  # total, activated and embedding of the whole model


# ---------------------------------------------------------------------------------------------------------
# the workers (in the launched processes)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    return float((a - b).abs().max())


def _reference(model, x, y):
    """One process with the whole batch: loss, logits, router stats, gradients by name."""
    out = model(x, targets=y)
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    logits = model(x).logits.detach()
    model.zero_grad()
    return out, logits, grads


def _ep_step(model, raw, x, y, ep, fsdp: bool):
    """This process's share of the same batch through the wrapped EP model -> loss, logits, full gradients."""
    from deepseek_lm.train import expert_parallel as EP

    out = model(x, targets=y)
    (out.loss + out.aux_loss).backward()
    if not fsdp:
        EP.reduce_expert_grads(raw, ep)
    routed = {n for n, _ in EP.routed_parameters(raw)}
    grads = {}
    for name, p in raw.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = EP.gather_experts(grad, ep) if name in routed else grad
    norm = EP.clip_grad_norm_(raw, float("inf"), ep)
    logits = model(x).logits.detach()
    return out, logits, grads, norm


def _mean(values: list) -> torch.Tensor:
    return torch.stack(values).mean(0)


def equality(ep_size: str, cases: str, wraps: str) -> None:
    """Each EP group (N processes, 2 sequences each) against one process holding the group's 2N sequences;
    the group's average over the replicas against the average of those single processes."""
    import torch.distributed as dist

    from deepseek_lm.config import DeepSeekConfig
    from deepseek_lm.model import get_model
    from deepseek_lm.train import distributed as D
    from deepseek_lm.train import expert_parallel as EP

    torch.set_num_threads(1)
    info = D.init_distributed("cpu", 60)
    W, rank, N = info.world_size, info.rank, int(ep_size)
    ep = EP.setup(N, W, 4, 2, "fp32", 60)
    report = {}
    for case in cases.split(","):
        config = DeepSeekConfig.from_preset("tiny", **CASES[case])
        torch.manual_seed(0)
        model = get_model(config).train()
        model.gradient_checkpointing = case == "grad-checkpointing"
        for moe in model.moe_layers():
            moe.experts.use_grouped_mm = "slice-loop" not in case
            if case == "one-process-gets-nothing":
                moe.gate.e_score_correction_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
        x = torch.randint(0, config.vocab_size, (2 * W, 16))
        y = torch.randint(0, config.vocab_size, (2 * W, 16))
        groups = [slice(2 * g, 2 * (g + N)) for g in range(0, W, N)]  # each EP group's sequences
        refs = [_reference(model, x[g], y[g]) for g in groups]
        ref = refs[rank // N]
        ref_grads = {n: _mean([r[2][n] for r in refs]) for n in refs[0][2]}
        mine = slice(2 * (rank % N), 2 * (rank % N) + 2)  # this process's sequences within its group's
        for wrap in wraps.split(","):
            raw = copy.deepcopy(model)
            EP.shard_experts(raw, ep)
            wrapped = D.wrap_model(raw, info, torch.device("cpu"), fsdp=wrap == "fsdp", ep=ep)
            group = groups[rank // N]
            out, logits, grads, norm = _ep_step(
                wrapped, raw, x[group][mine], y[group][mine], ep, wrap == "fsdp"
            )
            loss = D.all_reduce(out.loss.detach().clone(), info) / W
            counts = [D.all_reduce(s.counts.clone(), info) for s in out.router_stats]
            ref_counts = [sum(r[0].router_stats[i].counts for r in refs) for i in range(len(counts))]
            report[f"{case}/{wrap}"] = {
                "loss": _max_diff(loss, _mean([r[0].loss.detach() for r in refs])),
                "logits": _max_diff(logits, ref[1][mine]),
                "grads": max(_max_diff(grads[n], ref_grads[n]) for n in ref_grads),
                "norm": _max_diff(norm, torch.nn.utils.get_total_norm(list(ref_grads.values()))),
                "counts_equal": all(torch.equal(a, b) for a, b in zip(counts, ref_counts)),
                "dropped_equal": all(
                    float(a.dropped_frac) == float(b.dropped_frac)
                    for a, b in zip(out.router_stats, ref[0].router_stats)
                ),
                "dropped": float(ref[0].router_stats[0].dropped_frac),
            }
    if rank == 0:
        print(json.dumps(report))
    dist.destroy_process_group()


def die_mid_dispatch(data_dir: str, out: str) -> None:
    """Train with EP 2; process 1 exits inside its second all-to-all (the first MoE layer's combine, after
    its tokens went out), leaving process 0 waiting for the outputs."""
    from deepseek_lm.cli import main
    from deepseek_lm.model import expert_parallel

    if os.environ["RANK"] == "1":
        real, calls = expert_parallel._all_to_all, []

        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os._exit(17)
            return real(*args, **kwargs)

        expert_parallel._all_to_all = dying
    argv = ["train", "--preset", "tiny", "--data-dir", data_dir, "--out", out, "--train.expert_parallel", "2",
            "--train.peak_flops", "1e12", "--train.dist_timeout_s", "60"]  # fmt: skip
    main(argv)  # exits the process (a torchrun worker)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    {"equality": equality, "die_mid_dispatch": die_mid_dispatch}[sys.argv[1]](*sys.argv[2:])
