"""Checkpoint loads across virtual-pipeline and data-parallel changes (test_checkpoint_reshard.py),
in real gloo groups (tests/distributed.py).

  save_launch   2 ranks: PP=2 x VPP=2 checkpoints (regular and distributed optimizer) and DP=2
                distributed-optimizer checkpoints (one gradient bucket, and BUCKET_SIZE buckets)
                with their optimizer state gathered.
  load2_launch  2 fresh ranks: the VPP checkpoints loaded at PP=2 without VPP and at TP=2; the
                DP=2 ones refused in other gradient buckets.
  load1_launch  1 rank: the DP=2 distributed-optimizer checkpoints loaded at DP=1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import tests.training.mc_megatron_src  # noqa: F401  (first: may redirect `import megatron`)
from scope_megatron.training import checkpoint, models, platform
from tests.training import mc_workers as w

# 4 layers: PP=2 x VPP=2 chunks of one layer each.
CFG = models.ModelConfig.preset("qwen3", **{**w.SIZES, "num_layers": 4})
# elements per DDP bucket (with overlap_grad_reduce, which keeps it): several buckets in the toy
BUCKET_SIZE = 4000


def _result(checks: dict) -> dict:
    results: dict = {}
    w.run_checks(checks, results)
    return {"checks": results, "hits": {}}


def _dp_zero_state(optimizer) -> dict:
    """The distributed optimizer's state gathered on DP rank 0 (Megatron's coalesced, unpadded
    layout): {"gbuf.dtype.key": float64 sums} (empty on the other ranks)."""
    (inner,) = checkpoint._sub_optimizers(optimizer)
    state = inner.get_parameter_state_dp_zero()
    out = {}
    if dist.get_rank() != 0:
        return out
    for gbuf_idx in range(len(inner.buffers)):
        for dtype_key, tensors in state[gbuf_idx].items():
            for key in ("param", "exp_avg", "exp_avg_sq"):
                t = tensors[key].double()
                out[f"{gbuf_idx}.{dtype_key}.{key}"] = [float(t.sum()), float(t.abs().sum())]
    return out


def save_launch(ctx) -> dict:
    checks = {}
    w._setup(1, 2, ctx.seed, vpp=2)

    def save_vpp(distributed: bool):
        platform.seed_everything(ctx.seed + 5)
        ddp, optimizer, scheduler = w.build_student(CFG, distributed_optimizer=distributed)
        assert len(ddp) == 2
        w.train(ddp, optimizer, scheduler, range(2), ctx.seed)
        name = f"ckpt_pp2_vpp2_{'dist' if distributed else 'regular'}"
        checkpoint.save_checkpoint(w.shared_dir() / name, 2, ddp, optimizer, scheduler)
        w._save_json(f"{name}.json", {"eval_loss": w._eval_loss(ddp, ctx.seed)})

    checks["save_pp2_vpp2_regular"] = lambda: save_vpp(False)
    checks["save_pp2_vpp2_distributed"] = lambda: save_vpp(True)
    results = _result(checks)
    platform.destroy_parallel()

    w._setup(1, 1, ctx.seed)

    def save_dp2(name: str, bucket_size=None):
        platform.seed_everything(ctx.seed + 6)
        ddp, optimizer, scheduler = w.build_student(distributed_optimizer=True, overlap=bucket_size is not None,
                                                    bucket_size=bucket_size)
        (sizes,) = checkpoint._sub_optimizers(optimizer)[0].per_bucket_numel_unpadded[0].values()
        buckets = len(sizes)
        assert (buckets > 2) == (bucket_size is not None), buckets
        w.train(ddp, optimizer, scheduler, range(2), ctx.seed)
        checkpoint.save_checkpoint(w.shared_dir() / name, 2, ddp, optimizer, scheduler)
        w._save_json(f"{name}.json", {"eval_loss": w._eval_loss(ddp, ctx.seed), "state": _dp_zero_state(optimizer)})

    more = _result({"save_dp2_distributed": lambda: save_dp2("ckpt_dp2_dist"),
                    "save_dp2_distributed_buckets": lambda: save_dp2("ckpt_dp2_dist_buckets", BUCKET_SIZE)})
    platform.destroy_parallel()
    results["checks"].update(more["checks"])
    return results


def _load_vpp_regular(seed: int) -> None:
    expected = w._load_json("ckpt_pp2_vpp2_regular.json")["eval_loss"]
    ddp, optimizer, scheduler = w.build_student(CFG)
    checkpoint.load_checkpoint(w.shared_dir() / "ckpt_pp2_vpp2_regular", ddp, optimizer, scheduler)
    got = w._eval_loss(ddp, seed)
    assert abs(got - expected) < 1e-5, f"loss after resharding {got} != {expected}"
    w.train(ddp, optimizer, scheduler, range(2, 3), seed)


def _load_vpp_distributed_refused() -> None:
    ddp, optimizer, _ = w.build_student(CFG, distributed_optimizer=True)
    try:
        checkpoint.load_checkpoint(w.shared_dir() / "ckpt_pp2_vpp2_dist", ddp, optimizer)
    except checkpoint.CheckpointError as exc:
        assert "reshards across DP only" in str(exc), str(exc)
    else:
        raise AssertionError("a dp_reshardable optimizer state saved at VPP=2 loaded at VPP=None")


def _without_recorded_buckets(name: str) -> str:
    """A copy of checkpoint `name` as saved before scope_checkpoint.json recorded the gradient
    buckets (and the DDP settings): the load must read Megatron's own record instead."""
    old = f"{name}_old"
    if dist.get_rank() == 0:
        import json
        import shutil

        shutil.copytree(w.shared_dir() / name, w.shared_dir() / old)
        (ckpt,) = (p for p in (w.shared_dir() / old).iterdir() if p.name.startswith("iter_"))
        meta = json.loads((ckpt / checkpoint.METADATA).read_text())
        assert meta["optimizer"].pop("bucket_layout") and "ddp" in meta["optimizer"], meta["optimizer"]
        del meta["optimizer"]["ddp"]
        (ckpt / checkpoint.METADATA).write_text(json.dumps(meta))
    dist.barrier()
    return old


def _load_other_buckets_refused(name: str, bucket_size, fix: str) -> None:
    """At the saved layout (DP=2) but in other gradient buckets: a CheckpointError on every rank
    before anything is read, not dist_checkpointing's shape error mid-load; it names the fix."""
    ddp, optimizer, _ = w.build_student(distributed_optimizer=True, overlap=bucket_size is not None,
                                        bucket_size=bucket_size)
    before = w._param_digest(ddp)
    try:
        checkpoint.load_checkpoint(w.shared_dir() / name, ddp, optimizer)
    except checkpoint.CheckpointError as exc:
        for text in ("gradient buckets it was saved with", "bucket(s) of", "bucket_size", fix):
            assert text in str(exc), str(exc)
    else:
        raise AssertionError(f"{name} loaded into other gradient buckets (bucket_size={bucket_size})")
    assert w._param_digest(ddp) == before, "the refused load changed the model"


def load2_launch(ctx) -> dict:
    w._setup(1, 2, ctx.seed)
    results = _result({"reshard_pp2_vpp2_to_pp2": lambda: _load_vpp_regular(ctx.seed),
                       "distributed_optimizer_across_vpp_refused": _load_vpp_distributed_refused})
    platform.destroy_parallel()
    w._setup(2, 1, ctx.seed)
    more = _result({"reshard_pp2_vpp2_to_tp2": lambda: _load_vpp_regular(ctx.seed)})
    platform.destroy_parallel()
    results["checks"].update(more["checks"])
    w._setup(1, 1, ctx.seed)
    more = _result({
        "distributed_optimizer_more_buckets_refused":
        lambda: _load_other_buckets_refused("ckpt_dp2_dist", BUCKET_SIZE, "saved without overlap_grad_reduce"),
        "distributed_optimizer_fewer_buckets_refused":
        lambda: _load_other_buckets_refused("ckpt_dp2_dist_buckets", None,
                                            f"--overlap-grad-reduce true --ddp-bucket-size {BUCKET_SIZE}"),
        "distributed_optimizer_other_buckets_refused_unrecorded":
        lambda: _load_other_buckets_refused(_without_recorded_buckets("ckpt_dp2_dist_buckets"), None,
                                            "not recorded in this checkpoint")})
    platform.destroy_parallel()
    results["checks"].update(more["checks"])
    return results


def load1_launch(ctx) -> dict:
    w._setup(1, 1, ctx.seed)

    def dp2_to_dp1(name: str, bucket_size=None, saved=None):
        saved = w._load_json(f"{saved or name}.json")
        ddp, optimizer, scheduler = w.build_student(distributed_optimizer=True, overlap=bucket_size is not None,
                                                    bucket_size=bucket_size)
        checkpoint.load_checkpoint(w.shared_dir() / name, ddp, optimizer, scheduler)
        got = w._eval_loss(ddp, ctx.seed)
        assert abs(got - saved["eval_loss"]) < 1e-5, (got, saved["eval_loss"])
        state = _dp_zero_state(optimizer)
        assert state, "no optimizer state gathered"  # equal key sets would pass empty
        assert state.keys() == saved["state"].keys(), (sorted(state), sorted(saved["state"]))
        for key in state:
            torch.testing.assert_close(torch.tensor(state[key]), torch.tensor(saved["state"][key]),
                                       rtol=1e-9, atol=1e-9, msg=key)
        w.train(ddp, optimizer, scheduler, range(2, 3), ctx.seed)

    results = _result({"reshard_distributed_optimizer_dp2_to_dp1": lambda: dp2_to_dp1("ckpt_dp2_dist"),
                       "reshard_distributed_optimizer_buckets_dp2_to_dp1":
                       lambda: dp2_to_dp1("ckpt_dp2_dist_buckets", BUCKET_SIZE),
                       # the copy load2 made without the recorded buckets (Megatron's record is read)
                       "reshard_distributed_optimizer_unrecorded_buckets_dp2_to_dp1":
                       lambda: dp2_to_dp1("ckpt_dp2_dist_buckets_old", BUCKET_SIZE, saved="ckpt_dp2_dist_buckets")})
    platform.destroy_parallel()
    return results
