"""Checkpoints: path resolution and its errors (plain files), and in gloo groups (mc_workers'
launches): resume equals an uninterrupted run (TP=2 with the regular optimizer, DP=2 with the
distributed one), loads across layouts (TP=2 -> TP=1/DP=2, TP=2 -> PP=2, PP=2 -> TP=2), saves
killed by SIGKILL at every stage (and at an arbitrary moment) leave `latest` loadable, the next
save cleans up and prunes, and loads into a different model or optimizer fail clearly."""
import json

import pytest

import tests.training.mc_megatron_src  # noqa: F401  (first: may redirect `import megatron`)
from scope_megatron.training import checkpoint
from tests.training import mc_launches
from tests.training.mc_kill_saver import KILL_POINTS


def _fake_checkpoint(path, step=3, **overrides):
    path.mkdir(parents=True)
    meta = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "step": step,
            **overrides}
    (path / checkpoint.METADATA).write_text(json.dumps(meta))
    return path


def test_iter_names():
    assert checkpoint.iter_name(42) == "iter_0000042"
    assert checkpoint.iter_name(12345678) == "iter_12345678"


def test_resolve_root_through_latest(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "iter_0000003")
    (tmp_path / "latest").write_text("iter_0000003\n")
    assert checkpoint.resolve_checkpoint(tmp_path) == ckpt
    assert checkpoint.resolve_checkpoint(ckpt) == ckpt
    assert checkpoint.checkpoint_info(tmp_path)["step"] == 3
    assert checkpoint.has_checkpoint(tmp_path) and checkpoint.has_checkpoint(ckpt)
    assert not checkpoint.has_checkpoint(tmp_path / "nothing")
    assert not checkpoint.has_checkpoint(tmp_path / "iter_0000003" / "rng")


@pytest.mark.parametrize("layout,message", [
    ("missing", "does not exist; pass a checkpoint root"),
    ("empty", "holds no checkpoint: neither a `latest` file"),
    ("interrupted", "is an interrupted save, not a checkpoint"),
    ("dangling_latest", "names iter_0000009, which holds no complete checkpoint"),
    ("other_version", "has checkpoint format version 99"),
])
def test_resolve_errors(tmp_path, layout, message):
    path = tmp_path / "ckpt"
    if layout == "empty":
        path.mkdir()
    elif layout == "interrupted":
        path = tmp_path / ".tmp-iter_0000004"
        path.mkdir()
    elif layout == "dangling_latest":
        path.mkdir()
        (path / "latest").write_text("iter_0000009\n")
    elif layout == "other_version":
        _fake_checkpoint(path, format_version=99)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.checkpoint_info(path)
    assert message in str(info.value)


# ---- in gloo groups -----------------------------------------------------------------------------

PHASE1 = ["resume_tp2_phase1", "resume_dp2_distributed_optimizer_phase1", "save_tp2_for_reshard",
          "save_pp2_for_reshard"]
PHASE2 = ["resume_tp2_equals_uninterrupted", "resume_dp2_distributed_optimizer_equals_uninterrupted",
          "reshard_tp2_to_tp1_dp2", "reshard_tp2_to_pp2", "reshard_pp2_to_tp2",
          "load_error_different_model", "load_different_vocab_padding",
          "load_error_optimizer_kind_mismatch", "load_error_distributed_optimizer_across_tp",
          "load_weights_only",
          "next_save_removes_interrupted_save", "next_save_replaces_orphaned_checkpoint"]


@pytest.mark.parametrize("check", PHASE1)
def test_saves(check):
    mc_launches.assert_check("train", check)


@pytest.mark.parametrize("check", PHASE2)
def test_loads_in_fresh_processes(check):
    mc_launches.assert_check("resume", check)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_during_save_leaves_latest_loadable(point):
    mc_launches.assert_killed(point)
    mc_launches.assert_check("resume", f"killed_{point}_latest_loads")
