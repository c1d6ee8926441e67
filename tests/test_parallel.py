"""FSDP2 helpers, the loop's pieces and DCP checkpoints, without Ray: real gloo process groups via torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data_stream import micro_batch_indices
from training.loop import TrainConfig, lr_at, param_groups
from core.config import ConfigError
from model.llama import ModelArgs, build_model

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=256, vocab_size=300, max_seq_len=64,
             tie_embeddings=True)

# Runs under torchrun with 2 (gloo) ranks: shards, compares the fused loss with forward()'s (and with selective
# activation checkpointing), trains 3 steps, saves a DCP checkpoint, and reports what each rank holds.
TWO_RANKS = textwrap.dedent("""
    import json, sys, torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from training import checkpointing
    from training.parallel import apply_fsdp, local_param_count
    from training.loop import param_groups
    from training.objectives.pretrain import causal_lm_loss, fused_lm_loss
    from model.llama import ModelArgs, build_model
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    args = ModelArgs(**json.loads(sys.argv[2]))
    batch = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
    res = {}
    # the last run (selective activation checkpointing) is also the one checkpointed: DCP names without wrappers
    for name, fn, ac in (("plain", causal_lm_loss, "none"), ("fused", fused_lm_loss, "none"),
                         ("fused_sac", fused_lm_loss, "selective")):
        m = build_model(args, seed=0)
        apply_fsdp(m, device_type="cpu", mesh=init_device_mesh("cpu", (2,)), activation_checkpointing=ac)
        opt = torch.optim.AdamW(param_groups(m, 0.1), lr=1e-2)
        losses = []
        for _ in range(3):
            loss = fn(m, batch); loss.backward(); opt.step(); opt.zero_grad()
            losses.append(loss.item())
        res[name] = losses
    res["local"], res["full"] = local_param_count(m)
    checkpointing.save(out_dir + "/ckpt", m, opt, {"step": 3, "consumed": 12}, rank=rank)
    with torch.no_grad():
        res["after"] = causal_lm_loss(m, batch).item()
    json.dump(res, open(f"{out_dir}/rank{rank}.json", "w"))
""")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    script = d / "two_ranks.py"
    script.write_text(TWO_RANKS)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(d), json.dumps(SMALL)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return d, [json.loads((d / f"rank{i}.json").read_text()) for i in range(2)]


def test_each_rank_holds_half_the_parameters(two_rank_run):
    _, ranks = two_rank_run
    full = build_model(ModelArgs(**SMALL)).state_dict()
    n = sum(p.numel() for p in build_model(ModelArgs(**SMALL)).parameters())
    assert all(r["full"] == n for r in ranks) and len(full) > 0
    for r in ranks:
        assert 0.45 * n <= r["local"] <= 0.55 * n, (r["local"], n)
    assert sum(r["local"] for r in ranks) == n


def test_fused_loss_trains_exactly_like_forward_loss(two_rank_run):
    _, ranks = two_rank_run
    for r in ranks:
        torch.testing.assert_close(r["fused"], r["plain"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["fused_sac"], r["plain"], rtol=1e-5, atol=1e-5)  # AC under FSDP2: same steps
        assert r["plain"][-1] < r["plain"][0]  # three AdamW steps on one batch reduce its loss


def test_dcp_checkpoint_from_two_ranks_loads_in_one_process_and_exports_hf(two_rank_run, tmp_path):
    from training import checkpointing
    from training.objectives.pretrain import causal_lm_loss
    from model.hf import load_hf

    d, ranks = two_rank_run
    assert checkpointing.read_train_state(d / "ckpt") == {"step": 3, "consumed": 12}
    out = checkpointing.dcp_to_hf(d / "ckpt", ModelArgs(**SMALL), None, tmp_path / "hf")
    model, _ = load_hf(out)
    for rank, r in enumerate(ranks):  # the gathered weights give each rank's post-training loss
        batch = torch.randint(0, SMALL["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            assert causal_lm_loss(model, batch).item() == pytest.approx(r["after"], rel=1e-5)


@pytest.mark.parametrize("world,micro,batch", [(1, 4, 16), (2, 4, 16), (2, 2, 16), (4, 1, 8)])
def test_micro_batches_cover_each_step_exactly_once(world, micro, batch):
    accum = TrainConfig(batch_size=batch, micro_batch_size=micro, warmup_steps=0).grad_accum(world)
    for consumed in (0, batch, 7 * batch):
        got = np.concatenate([micro_batch_indices(consumed, a, r, world, micro)
                              for a in range(accum) for r in range(world)])
        assert sorted(got.tolist()) == list(range(consumed, consumed + batch))


def test_grad_accum_rejects_indivisible_batch():
    with pytest.raises(ConfigError, match="batch_size=12 is not a multiple"):
        TrainConfig(batch_size=12, micro_batch_size=4, warmup_steps=0).grad_accum(2)
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(max_steps=5, warmup_steps=10)


def test_lr_warms_up_then_decays_to_floor():
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(1, cfg) == pytest.approx(0.1) and lr_at(10, cfg) == pytest.approx(1.0)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_embedding():
    m = build_model(ModelArgs(**SMALL))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any(p is m.tok_embeddings.weight for p in no_decay["params"])
    assert any(p is m.norm.weight for p in no_decay["params"])
    assert any(p is m.layers[0].attention.wq.weight for p in decay["params"])
    assert all(p.dim() == 2 for p in decay["params"])


def test_check_resources_names_the_shortfall():
    from cluster.connect import check_resources

    with pytest.raises(ConfigError, match="4 GPU worker.*has 0 GPU"):
        check_resources(num_workers=4, use_gpu=True, cpus_per_worker=1, resources={"CPU": 8.0})
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        check_resources(num_workers=3, use_gpu=False, cpus_per_worker=2, resources={"CPU": 4.0})
    check_resources(num_workers=2, use_gpu=False, cpus_per_worker=1, resources={"CPU": 2.0})


def test_fractional_gpu_workers_share_a_card():
    """scaling.gpus_per_worker < 1: an SFT worker and a rollout actor on one GPU (bench/smollm2_recipe.py)."""
    from cluster.connect import check_resources
    from jobs.trainer import ScalingSettings

    check_resources(num_workers=2, use_gpu=True, cpus_per_worker=1, gpus_per_worker=0.5,
                    resources={"CPU": 4.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="3 GPU worker.*gpus_per_worker=0.5.*has 1 GPU"):
        check_resources(num_workers=3, use_gpu=True, cpus_per_worker=1, gpus_per_worker=0.5,
                        resources={"CPU": 4.0, "GPU": 1.0})
    s = ScalingSettings(num_workers=1, use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=4)
    assert s.resources_per_worker() == {"CPU": 4, "GPU": 0.5}
    assert ScalingSettings(num_workers=1).resources_per_worker() == {"CPU": 1.0}
    for bad, msg in (({"use_gpu": True, "gpus_per_worker": 0}, "fraction"),
                     ({"use_gpu": True, "gpus_per_worker": 1.5}, "whole number"),
                     ({"use_gpu": False, "gpus_per_worker": 0.5}, "needs scaling.use_gpu")):
        with pytest.raises(ConfigError, match=msg):
            ScalingSettings(**bad)


def test_mfu_row_length_is_the_micro_batch_not_the_context():
    """MFU's attention term uses each micro-batch's own row length: T for packed pretraining rows (B, T+1), the padded
    length for SFT/DPO rows — not data.max_len or the model's context (a 1 k-token chat on an 8 k-context model)."""
    from training.objectives.sft import SftObjective
    from training.objectives.pretrain import PretrainObjective

    assert PretrainObjective().seq_len(torch.zeros(4, 129, dtype=torch.long)) == 128
    rows = {"tokens": torch.zeros(4, 37, dtype=torch.long), "labels": torch.zeros(4, 37, dtype=torch.long)}
    assert SftObjective().seq_len(rows) == 37


def test_step_callbacks_are_module_function_paths():
    """run.callbacks (how tests inject faults, tests/faults.py): malformed paths are refused in the config, paths
    that do not resolve when the worker loads them."""
    from jobs.trainer import RunSettings
    from training.loop import load_callbacks

    with pytest.raises(ConfigError, match="module:function"):
        RunSettings(callbacks=["tests.faults"])
    assert [f.__name__ for f in load_callbacks(["tests.faults:record_consumed"])] == ["record_consumed"]
    with pytest.raises(ConfigError, match="tests.faults:nope"):
        load_callbacks(["tests.faults:nope"])


def _backward_ops_and_grads(mode: str) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """How often backward ran matmuls (``mm``) and SiLU's forward (a recomputed elementwise op) for one step of
    SMALL with activation checkpointing ``mode``, and the gradients (names without the wrapper prefix)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from training.objectives.pretrain import causal_lm_loss
    from training.parallel import checkpoint_blocks

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = {"mm": 0, "silu": 0}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in self.ops:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    model = checkpoint_blocks(build_model(ModelArgs(**SMALL), seed=0), mode)
    batch = torch.randint(0, SMALL["vocab_size"], (4, 33), generator=torch.Generator().manual_seed(0))
    loss = causal_lm_loss(model, batch)
    with Count() as count:
        loss.backward()
    names = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return count.ops, names


def test_activation_checkpointing_modes_keep_gradients_and_recompute_what_they_say():
    """none / full / selective (training/parallel.AC_MODES) give the same gradients. In backward, full recomputes
    the blocks' matmuls and elementwise ops; selective recomputes the elementwise ops only (SiLU runs again, no extra
    matmul: their outputs were kept); none recomputes nothing."""
    from core.config import from_dict
    from training.parallel import checkpoint_blocks

    got = {mode: _backward_ops_and_grads(mode) for mode in ("none", "full", "selective")}
    ref = got["none"][1]
    for mode in ("full", "selective"):
        assert got[mode][1].keys() == ref.keys()
        for name, g in ref.items():
            torch.testing.assert_close(got[mode][1][name], g, rtol=1e-6, atol=1e-7, msg=f"{mode}: {name}")
    ops = {mode: o for mode, (o, _) in got.items()}
    # full recomputes each block up to the last tensor backward needs: 6 of its 7 projections (w2's output is not)
    assert ops["full"]["mm"] == ops["none"]["mm"] + 6 * SMALL["n_layers"], ops
    assert ops["selective"]["mm"] == ops["none"]["mm"], ops
    assert ops["none"]["silu"] == 0 and ops["full"]["silu"] == ops["selective"]["silu"] == SMALL["n_layers"], ops
    with pytest.raises(ValueError, match="not one of"):
        checkpoint_blocks(build_model(ModelArgs(**SMALL)), "some")
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        from_dict(TrainConfig, {"activation_checkpointing": True}, "train")
