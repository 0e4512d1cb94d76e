"""The trainer end to end (issue 4's tests): the embedded default shortened at TP=2, PP=2 and
DP=2, resume == uninterrupted, the teacher frozen, the loss falling, and bad configurations
failing before anything is built. Needs the committed toy checkpoints (checkpoints/toy)."""
import dataclasses

import pytest

from scope_megatron.training.config import load_config
from scope_megatron.training.trainer import preflight
from scope_megatron.utils.config_io import ConfigError
from tests.conftest import SESSION_SEED
from tests.distributed import run_workers

_cache = {}


def _launch(name):
    if name not in _cache:
        try:
            _cache[name] = run_workers(f"tests.training.trainer_workers:{name}", 2, seed=SESSION_SEED,
                                       timeout=400)[0]
        except RuntimeError as exc:
            _cache[name] = exc
    if isinstance(_cache[name], Exception):
        pytest.fail(str(_cache[name]))
    return _cache[name]


@pytest.mark.parametrize("run,layout", [("tp2", [2, 1, 1]), ("pp2", [1, 2, 1]), ("dp2", [1, 1, 2])])
def test_layouts_train_evaluate_and_checkpoint(run, layout):
    r = _launch("layouts")[run]
    assert r["layout"] == layout
    loss = dict(r["loss"])
    assert sorted(loss) == [1, 2, 3] and all(v == v for v in loss.values())  # finite
    assert sorted(dict(r["eval"])) == [0, 2, 3]
    assert r["checkpoints"] == ["iter_0000002", "iter_0000003"]


@pytest.mark.parametrize("run", ["tp2", "pp2", "dp2", "resumed"])
def test_teacher_gets_no_gradient_and_never_changes(run):
    r = _launch("layouts")[run]
    assert r["frozen_teacher"] and r["teacher_unchanged"]


def test_resume_equals_uninterrupted():
    runs = _launch("layouts")
    full, first, resumed = (runs[k] for k in ("uninterrupted", "first_half", "resumed"))
    assert [s for s, _ in first["loss"]] == [1, 2]
    # the resumed run's log keeps steps 1-2 of the first half and adds 3-4 after loading step 2
    assert [s for s, _ in resumed["loss"]] == [1, 2, 3, 4]
    for key in ("loss", "kl"):
        for (step, got), (_, want) in zip(resumed[key], full[key]):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (key, step)


def test_a_finished_run_is_reported_not_retrained():
    runs = _launch("layouts")
    resumed, again = runs["resumed"], runs["again"]
    assert again["loss"] == resumed["loss"] and again["checkpoints"] == resumed["checkpoints"]
    assert again["returned"]["loss"] == pytest.approx(dict(resumed["loss"])[4])
    assert "loss" in resumed["returned"]


def test_bf16_trains_from_the_loaded_weights_and_saves():
    """bf16 (the GPU default): the KL to the teacher stays where the loaded student starts; a
    stale optimizer copy of the initialization sent it from about 0.4 to about 9 after one step;
    and the checkpoints are written (an fp32 norm weight broke megatron's optimizer map)."""
    r = _launch("bf16")
    kl = [value for _, value in r["kl"]]
    assert len(kl) == 4 and max(kl) < 3 * kl[0], kl
    assert r["checkpoints"] == ["iter_0000002", "iter_0000004"]


def test_loss_decreases_on_the_toy_task():
    """Each step's update lowers the SCOPE loss of that step's batch (the gradient points the
    right way through rollouts, teacher scoring, the loss and Megatron's schedule)."""
    r = _launch("learning")
    assert all(a < b for a, b in zip(r["after"], r["before"])), r


# ---- bad configurations fail before training (no processes needed) ---------------------------

def _cfg(*flags):
    return load_config(list(flags))


@pytest.mark.parametrize("flags,world,match", [
    (["--tensor-model-parallel-size", "8"], 8, "num_attention_heads 4 is not divisible by TP=8"),
    (["--tensor-model-parallel-size", "3"], 3, "padded_vocab 32 is not divisible by TP=3"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible by TP=2"),
    (["--pipeline-model-parallel-size", "2", "--student-num-layers", "3"], 2, "num_layers 3 is not divisible by PP=2"),
    (["--teacher-vocab-size", "20"], 2, "student/teacher vocabulary mismatch"),
    (["--teacher-padded-vocab", "64"], 2, "student/teacher vocabulary mismatch"),
    (["--student-vocab-size", "20", "--teacher-vocab-size", "20"], 2, "not the task tokenizer's 18"),
    (["--load", "/nonexistent/student"], 2, "checkpoint.load '/nonexistent/student' holds no checkpoint"),
    (["--teacher-load", "/nonexistent/teacher"], 2, "teacher_load '/nonexistent/teacher' holds no checkpoint"),
    (["--prompts-per-step", "3"], 2, "not divisible by the data-parallel size 2"),
    # the toy prompt (9 tokens at 3 digits) + 200 > the toy models' 64 positions
    (["--rollout-max-response-len", "200"], 2,
     r"longest prompt \(9 tokens\) plus rollout.max_new_tokens 200 exceeds student.max_position_embeddings 64: "
     "lower --rollout-max-response-len to at most 55"),
    (["--teacher-max-position-embeddings", "32"], 2, "exceeds teacher.max_position_embeddings 32"),
    (["--eval-num-prompts", "1"], 2, "1 held-out prompt.s. cannot be split over the data-parallel size 2"),
])
def test_bad_configs_fail_in_preflight(flags, world, match):
    with pytest.raises(ConfigError, match=match):
        preflight(_cfg(*flags, "--save", "null"), world)


@pytest.mark.parametrize("flags,match", [
    (["--micro-batch-size", "12"], "multiple of rollout.n"),
    (["--teacher-load", "null"], "distills from a teacher"),
    (["--n-samples-per-prompt", "1"], "rollout.n must be >= 2"),
    (["--lr", "-1"], "lr > 0"),
    (["--precision", "fp16"], "precision must be 'auto', 'bf16' or 'fp32', got 'fp16'"),
    (["--ddp-bucket-size", "20000"], "ddp_bucket_size needs overlap_grad_reduce"),
    (["--overlap-grad-reduce", "true", "--ddp-bucket-size", "0"], "ddp_bucket_size must be None or an integer >= 1"),
    (["--teacher-engine", "sglang", "--teacher-serving-sglang-urls", "http://t:1", "--scope-kl-estimator", "k3",
      "--scope-student-temperature", "0.6"], "pass --scope-teacher-temperature 1"),
    (["--teacher-engine", "sglang", "--teacher-serving-sglang-model-path", "/m/teacher", "--scope-kl-estimator",
      "k3", "--rollout-engine", "sglang", "--rollout-sglang-model-path", "/m/student"],
     "would share ports: pass e.g. --teacher-serving-sglang-base-port 31000"),
])
def test_bad_configs_fail_when_parsed(flags, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*flags)


def test_a_save_folder_that_cannot_be_resumed_is_refused_in_preflight(tmp_path):
    """Starting over into a folder of checkpoints would overwrite or prune them: a `latest` that
    names a missing checkpoint, or --resume false, is an error before any step (once, such a
    run trained from step 1 and replaced the good iter_0000002)."""
    from scope_megatron.training import checkpoint

    save = tmp_path / "ckpt"
    (save / "iter_0000002").mkdir(parents=True)
    (save / "iter_0000002" / checkpoint.METADATA).write_text("{}")
    (save / checkpoint.LATEST).write_text("iter_0000004")  # its checkpoint was deleted
    with pytest.raises(ConfigError, match="holds checkpoints but none to resume from .*iter_0000004"):
        preflight(_cfg("--save", str(save)), 2)
    (save / checkpoint.LATEST).write_text("iter_0000002")
    assert preflight(_cfg("--save", str(save)), 2) == 2  # resumable: a resume
    with pytest.raises(ConfigError, match="already holds a checkpoint and checkpoint.resume is false"):
        preflight(_cfg("--save", str(save), "--resume", "false"), 2)
    assert preflight(_cfg("--save", str(tmp_path / "fresh"), "--resume", "false"), 2) == 2
    (save / checkpoint.LATEST).unlink()  # an interrupted first save: started over (and replaced)
    assert preflight(_cfg("--save", str(save)), 2) == 2


def test_a_token_budget_frees_micro_batch_size():
    """With --max-tokens-per-micro-batch, micro_batch_size is not used: no divisibility rule on it
    (the run was once refused for a micro_batch_size it would never read)."""
    cfg = _cfg("--save", "null", "--max-tokens-per-micro-batch", "512", "--micro-batch-size", "24")
    assert preflight(cfg, 2) == 2
    with pytest.raises(ConfigError, match="not a multiple of training.micro_batch_size 24"):
        preflight(_cfg("--save", "null", "--micro-batch-size", "24"), 2)


def test_default_config_passes_preflight_on_two_processes():
    cfg = _cfg("--save", "null")
    assert preflight(cfg, 2) == 2
    assert dataclasses.asdict(cfg)["scope"]["algorithm"] == "scope"


def test_config_docs_are_current():
    from pathlib import Path

    from scope_megatron.training.config import TrainConfig
    from scope_megatron.utils.config_io import markdown_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "training-config.md").read_text()
    assert doc.endswith(markdown_table(TrainConfig)), (
        "docs/training-config.md is stale: regenerate the table with "
        "`python -m scope_megatron.training.config --markdown`")


def test_checkpoint_loads_into_a_differently_padded_model():
    r = _launch("paddings")
    assert r["shapes"] == [[2, 12, 32], [2, 12, 40]]
    assert r["max_diff"] <= 1e-6 * max(1.0, r["scale"]), r


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_kv_cache_decoding_matches_full_recompute(layout):
    r = _launch("decoding")[layout]
    assert r["same_ids"] and r["logprob_diff"] < 1e-4, r
    assert r["finished"] > 0.5, r  # the student writes real responses, not noise


def test_prompt_dataset_task_trains_and_evaluates():
    r = _launch("prompt_task")
    assert r["same_ids"] and r["stop_ids"] == [2] and r["pad_id"] == 0
    assert r["steps"] == [1, 2]
    assert [s for s, _ in r["eval"]] == [0, 2] and all(0 <= v <= 1 for _, v in r["eval"])


@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2_tensor", "tp2_topk", "tp2_t06"])
def test_sglang_rollouts_and_teacher(layout):
    """rollout.engine / teacher_serving.engine 'sglang' against the test servers: no Megatron
    teacher is built, weights reach the server after every step (versions checked by the sync,
    which also compares weight values), the engine's log-probs match the trainer's recomputation
    (at the sampling temperature when it differs from the training one), evaluation runs through
    the server."""
    r = _launch("sglang")[layout]
    assert not r["built_teacher"]
    assert r["steps"] == [1, 2]
    # a step whose 16 rollouts all verify has no teacher path and logs no KL (likelier at 0.6,
    # where the toy student is sharper); every step with a teacher path logs a finite KL
    for kl, members in zip(r["kl"], r["teacher_path"]):
        assert members is not None and (kl is not None) == (members > 0), (kl, members)
        assert kl is None or kl == kl, kl
    if layout != "tp2_t06":
        assert any(m > 0 for m in r["teacher_path"]), r["teacher_path"]
    assert [s for s, _ in r["eval"]] == [0, 2]
    assert r["versions"] == ["step-0", "step-1", "step-2"] and r["server_version"] == "step-2"
    want = "/update_weights_from_tensor" if layout.endswith("tensor") else "/update_weights_from_disk"
    assert r["update_calls"] == [want]
    assert all(g is not None and g < 1e-3 for g in r["gap"]), r["gap"]


def test_sglang_launch_command_and_gpu_lists():
    import sys

    from scope_megatron.training.serving import launch_command

    assert launch_command("python -m sglang.launch_server") == (sys.executable, "-m", "sglang.launch_server")
    assert launch_command("/envs/s/bin/python -m sglang.launch_server")[0] == "/envs/s/bin/python"
    with pytest.raises(ValueError, match="launch_command is empty"):
        launch_command(" ")
    cfg = _cfg("--rollout-sglang-gpus", "0,1;2,3", "--rollout-sglang-num-servers", "2")
    assert cfg.rollout.sglang.gpu_lists == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match="lists 2 servers, num_servers is 1"):
        _cfg("--rollout-sglang-gpus", "0,1;2,3")
    with pytest.raises(ConfigError, match="needs rollout.sglang.urls"):
        _cfg("--rollout-engine", "sglang")
    with pytest.raises(ConfigError, match="'full' needs the teacher's logits"):
        _cfg("--teacher-engine", "sglang", "--teacher-serving-sglang-urls", "http://a:1")


# ---- review: temperatures of the PPO ratio, extending a finished run ---------------------------

@pytest.mark.parametrize("flags", [
    ["--rollout-temperature", "0.6", "--scope-kl-estimator", "sampled"],
    ["--algorithm", "grpo", "--teacher-load", "null", "--rollout-temperature", "0.6"],
    ["--algorithm", "grpo", "--teacher-load", "null", "--scope-student-temperature", "0.6"],
])
def test_ppo_ratio_refuses_engine_logprobs_at_another_temperature(flags):
    """The engine's log-probs are at the sampling temperature; the PPO ratio divides the
    trainer's (at scope.student_temperature) by them: different temperatures make the ratio
    wrong from the first update (clipped gradients), so the combination must fail loudly."""
    with pytest.raises(ConfigError, match="student_temperature"):
        _cfg(*flags)


@pytest.mark.parametrize("flags", [
    ["--rollout-temperature", "0.6"],  # full KL + MLE: the engine's log-probs are not used
    ["--rollout-temperature", "0.6", "--scope-kl-estimator", "sampled", "--scope-student-temperature", "0.6"],
    ["--rollout-temperature", "0", "--scope-kl-estimator", "sampled"],  # greedy: log-probs at T = 1
    ["--algorithm", "grpo", "--teacher-load", "null", "--rollout-temperature", "0.6",
     "--scope-old-logprobs", "recomputed"],
])
def test_consistent_temperatures_are_accepted(flags):
    _cfg(*flags)


def test_a_finished_run_continues_with_more_train_iters():
    """The trainer tells the user to raise --train-iters to continue a finished run: the LR
    scheduler saved at 4 iterations must load into the one built for 8 (the run's current
    configuration wins, as Megatron-LM's --override-opt-param-scheduler)."""
    import types

    import torch

    from scope_megatron.training.trainer import Trainer

    def scheduler(iters):
        cfg = _cfg("--train-iters", str(iters), "--lr-decay-style", "cosine", "--lr-warmup-iters", "1")
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
        return Trainer._scheduler(types.SimpleNamespace(cfg=cfg, optimizer=opt)), opt

    old, _ = scheduler(4)
    for _ in range(4):
        old.step(increment=1)
    new, opt = scheduler(8)
    new.load_state_dict(old.state_dict())
    assert new.num_steps == 4 and new.lr_decay_steps == 8
    assert 0 < opt.param_groups[0]["lr"] < 3e-4  # mid-way down the 8-iteration cosine
    again, _ = scheduler(4)  # an unchanged configuration resumes as before
    again.load_state_dict(old.state_dict())
    assert again.num_steps == 4 and again.get_lr(again.optimizer.param_groups[0]) == old.get_lr(old.optimizer.param_groups[0])


def test_a_resume_runs_with_the_new_lr_and_adam_values():
    """Megatron's scheduler reads each param group's max_lr / min_lr ahead of its own, and the
    checkpoint's optimizer state brings back the saved groups: the trainer writes this run's
    values back (a resume with a changed --lr once silently kept the old one)."""
    r = _launch("resume_with_new_optimizer_values")
    # the lr logged with each step is the one its update used (warm-up from 0 over 2 steps)
    assert r["logged_lr"] == [[1, 0.0], [2, pytest.approx(1.5e-4)]], r
    assert r["start"] == 2, r
    assert r["groups"], r
    for group in r["groups"]:
        assert group["lr"] == pytest.approx(1e-5) and group["max_lr"] == pytest.approx(1e-5), r
        assert group["min_lr"] == pytest.approx(1e-6), r
        assert tuple(group["betas"]) == pytest.approx((0.5, 0.999)) and group["eps"] == pytest.approx(1e-6), r


def test_sequence_parallel_decodes_and_trains():
    """--sequence-parallel true (TP=2): decoding (one token per step, prefixes of any length)
    runs with sequence parallelism off and samples what the model without it samples; the
    training rows are padded to a multiple of TP and give the same loss."""
    r = _launch("sequence_parallel")
    assert r["sp_on"] and r["sp_on_after_decoding"], r
    assert r["same_ids"] and r["logprob_diff"] < 1e-4, r
    assert r["padded_width"][1] % 2 == 0 and r["padded_width"][1] >= r["padded_width"][0], r
    assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-5, abs=1e-6), r
    assert "divisible by tensor parallel size" in r["odd_width_error"], r  # unpadded odd rows refused


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "dp2_overlap"])
def test_teacher_logits_in_waves_give_the_same_step(layout):
    """training.teacher_logits_gib too small for a step's teacher logits: the teacher scores one
    micro-batch at a time, each followed by the student's pass over it, and the update equals
    the one with every micro-batch scored first (the gradient is divided once, by the step's
    total count, and reduced over data-parallel ranks once; with overlap_grad_reduce in several
    buckets too, whose reductions start only in the last wave)."""
    ranks = _launch("teacher_waves")[layout]
    if layout == "dp2_overlap":
        assert all(b > 1 for r in ranks for b in r["buckets"]), ranks
    for r in ranks:
        assert r["micro_batches"] >= 2, r
        assert r["waves"] == [None, 1], r
        # prepare scores everything when it fits; in waves the step does, and drops each wave's logits
        assert r["scored_in_prepare"] == ([["teacher_logits"], []] if r["last_stage"] else [[], []]), r
        assert r["leftover"] == [], r
        assert r["max_param_change"] > 1e-6, r  # the step trained
        assert r["max_param_diff"] <= 1e-6 * max(1.0, r["max_param_change"]), r
    assert [r["last_stage"] for r in ranks] == ([False, True] if layout == "pp2" else [True, True]), ranks
    # one reporting rank per replica: the last stage's TP rank 0
    reporting = [r for r in ranks if r["loss"][0] is not None]
    assert len(reporting) == (2 if layout.startswith("dp2") else 1) and all(r["last_stage"] for r in reporting), ranks
    for r in reporting:
        assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-6), r
        assert r["grad_norm"][1] == pytest.approx(r["grad_norm"][0], rel=1e-5), r


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "dp2_max_tokens", "tp2_waves", "pp2_opd"])
def test_micro_batches_that_cut_prompt_groups_give_the_same_step(layout):
    """--split-groups: micro-batches of 2 rollouts cut every group of 4; a forward pass without
    gradient first weights each rollout from its whole group, so the update, the loss and the
    group metrics equal those of micro-batches of whole groups (also with a dynamic batch size,
    and with the colocated teacher's logits in waves, whose log-probs are scored first)."""
    ranks = _launch("split_groups")[layout]
    for r in ranks:
        assert r["max_param_change"] > 1e-6, r  # the step trained
        # Adam's first step moves each weight by ±lr, except where |grad| is near eps (1e-8): there
        # the two micro-batchings' rounding (another summation order) moves it by up to lr / 2
        # (1.9e-5 seen at PP=2). Wrong weights flip whole gradients (2 lr, checked to fail); the
        # tight checks are the loss and the grad norm below (1e-5 relative).
        assert r["max_param_diff"] <= 0.5 * r["max_param_change"], r
        if r["last_stage"]:
            assert r["cut_groups"][1] >= 1, r
    reporting = [r for r in ranks if r["metrics"]["loss"][0] is not None]
    assert len(reporting) == (2 if layout.startswith("dp2") else 1), ranks
    for r in reporting:
        for key, (whole, split) in r["metrics"].items():
            assert (whole is None) == (split is None), (key, r)
            if whole is not None:
                assert split == pytest.approx(whole, rel=1e-5, abs=1e-6), (key, r)
        assert r["metrics"]["groups/total"][0] == 4 / (2 if layout.startswith("dp2") else 1), r


def test_colocated_top_k_teacher_keeps_k_values_per_token():
    """kl_estimator topk with a colocated teacher: prepare keeps the teacher's log-probs and its
    top-k ids and log-probs ([b, L, k]), not its [b, L, V/tp] logits, and the loss from them
    equals the loss from the logits (TP=2)."""
    r = _launch("teacher_waves")["topk"]
    assert r["keys"] == ["teacher_logprobs", "teacher_top_ids", "teacher_top_logprobs"], r
    assert r["shape"][-1] == 5, r
    assert r["losses"], r
    for stored, from_logits in r["losses"]:
        assert stored == pytest.approx(from_logits, rel=1e-5, abs=1e-6), r


def test_replica_metrics_sum_counts_and_keep_maxima():
    from scope_megatron.training.trainer import combine_replicas

    reported = [{"loss": 1.0, "rollouts/total": 8, "groups/all_correct": 1, "tokens": 100,
                 "throughput/tokens_per_s": 50.0, "logprob_diff/max": 0.1, "scope/teacher/weight_max": 0.6,
                 "reward/mean": 0.5},
                {"loss": 3.0, "rollouts/total": 8, "groups/all_correct": 0, "tokens": 60,
                 "throughput/tokens_per_s": 30.0, "logprob_diff/max": 0.3, "scope/teacher/weight_max": 0.4,
                 "reward/mean": 0.25}]
    out = combine_replicas(reported)
    assert out == {"loss": 2.0, "rollouts/total": 16, "groups/all_correct": 1, "tokens": 160,
                   "throughput/tokens_per_s": 80.0, "logprob_diff/max": 0.3, "scope/teacher/weight_max": 0.6,
                   "reward/mean": 0.375}
    # a mean over a path's rollouts weighs each replica by its count of them
    out = combine_replicas([{"kl/mean": 0.2, "rollouts/teacher_path": 14},
                            {"kl/mean": 2.0, "rollouts/teacher_path": 2}])
    assert out["kl/mean"] == pytest.approx((0.2 * 14 + 2.0 * 2) / 16) and out["rollouts/teacher_path"] == 16


def test_log_dir_of_an_unsaved_run_is_restarted_and_of_another_run_refused(tmp_path):
    """A run restarted before its first checkpoint starts over in its own log_dir; a log_dir
    holding another run's metrics (another checkpoint.save, or none) is a ConfigError."""
    from scope_megatron.training.trainer import _log_dir_verdict

    logs = tmp_path / "logs"
    assert _log_dir_verdict(logs, str(tmp_path / "ckpt")) is None  # nothing there
    logs.mkdir()
    (logs / "config.yaml").write_text(f"checkpoint:\n  save: {tmp_path / 'ckpt'}\n")
    assert _log_dir_verdict(logs, str(tmp_path / "ckpt")) is None  # a config but no metrics
    (logs / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    assert _log_dir_verdict(logs, str(tmp_path / "ckpt")) == "own"
    assert _log_dir_verdict(logs, str(tmp_path / "other")) == "other"
    assert _log_dir_verdict(logs, None) == "other"
    (logs / "config.yaml").unlink()
    assert _log_dir_verdict(logs, str(tmp_path / "ckpt")) == "other"


def test_rerun_without_checkpoints_into_the_same_log_dir_names_the_flags(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "pretrain_scope.py"
    argv = [sys.executable, str(script), "--train-iters", "1", "--save", "null", "--eval-interval", "0",
            "--prompts-per-step", "2", "--n-samples-per-prompt", "2", "--micro-batch-size", "2",
            "--log-dir", str(tmp_path / "logs")]
    repo = script.parents[1]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=repo)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=repo)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "Traceback" not in again.stderr and "--logging-overwrite true" in again.stderr \
        and "--log-dir" in again.stderr, again.stderr[-3000:]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_activation_recompute_reruns_the_layers_and_gives_the_same_update(layout):
    r = _launch("recompute")[layout]
    off = r["off"]
    forwards = off["layers"] * off["micro_batches"]
    assert off["calls"] == forwards, r
    assert r["full"]["calls"] == 2 * forwards, r  # every layer again in backward
    assert r["block"]["calls"] == forwards + off["micro_batches"], r  # the first layer of the stage again
    for mode in ("full", "block", "selective"):
        assert r[mode]["max_param_diff"] <= 1e-7, r


@pytest.mark.parametrize("flags,match", [
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"], "apply to recompute_granularity 'full' only"),
    (["--recompute-method", "uniform"], "apply to recompute_granularity 'full' only"),
    (["--recompute-granularity", "everything"], "must be 'full', 'selective' or null"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "99"],
     "exceeds the student's"),
])
def test_bad_recompute_settings_are_refused(flags, match):
    with pytest.raises(ConfigError, match=match):
        load_config(flags)


@pytest.mark.parametrize("mode", ["plain", "sp"])
def test_trimmed_micro_batches_give_the_same_loss(mode):
    """Without pipeline parallelism each micro-batch is cut to its own longest row (groups ordered
    by length), or packed to a token budget: narrower micro-batches, the same SCOPE loss (full KL
    against the teacher), at TP=2, also with sequence parallelism (widths a multiple of 2)."""
    r = _launch("trimmed")[mode]
    full, trimmed, packed = r["widths"]
    assert all(w[1] == r["step_width"] for w in full), r
    assert max(w[1] for w in trimmed) == r["step_width"] and min(w[1] for w in trimmed) < r["step_width"], r
    assert [w[1] for w in trimmed] == sorted((w[1] for w in trimmed), reverse=True), r  # longest first
    if mode == "sp":
        assert all(w[1] % 2 == 0 for w in trimmed), r
    assert r["losses"][1] == pytest.approx(r["losses"][0], rel=1e-6, abs=1e-7), r
    # a budget of 100 tokens: micro-batches of 1 or more groups (2 rows each), within budget
    assert len({w[0] for w in packed}) > 1 and sum(w[0] for w in packed) == sum(w[0] for w in full), r
    assert all(w[0] * w[1] <= 100 or w[0] == 2 for w in packed), r
    assert r["losses"][2] == pytest.approx(r["losses"][0], rel=1e-6, abs=1e-7), r


def test_micro_batches_trim_keeps_groups_and_cuts_only_padding():
    import torch

    from scope_megatron.training.step import StepInputs, micro_batches

    # 3 groups of 2 rows; prompt lengths 2..4, response lengths 1..6 (pad 0)
    plen = torch.tensor([2, 3, 4, 2, 3, 2])
    rlen = torch.tensor([1, 2, 6, 5, 3, 0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    width, length = int((plen + rlen).max()), int(rlen.max())
    tokens = torch.zeros(6, width, dtype=torch.int64)
    ids = torch.zeros(6, length, dtype=torch.int64)
    mask = torch.arange(length).unsqueeze(0) < rlen.unsqueeze(1)
    for i in range(6):
        tokens[i, :plen[i]] = 7
        ids[i, :rlen[i]] = torch.arange(1, rlen[i] + 1)
        tokens[i, plen[i]:plen[i] + rlen[i]] = ids[i, :rlen[i]]
    index = (plen.unsqueeze(1) - 1 + torch.arange(length)).clamp(max=width - 1)
    inputs = StepInputs(tokens=tokens, response_index=index, response_ids=ids, response_mask=mask,
                        old_logprobs=-torch.rand(6, length), group_ids=groups, correct=rlen > 2,
                        teacher={"teacher_logprobs": -torch.rand(6, length)})
    batches = micro_batches(inputs, 2, trim=True)
    assert len(batches) == 3  # one group each (zip below would stop at the shorter)
    longest = [max(int(plen[i] + rlen[i]) for i in range(6) if groups[i] == g) for g in range(3)]
    order = sorted(range(3), key=lambda g: -longest[g])
    for mb, g in zip(batches, order):
        rows = [i for i in range(6) if groups[i] == g]
        assert mb.tokens.shape[1] == longest[g]
        assert torch.equal(mb.tokens, tokens[rows, :longest[g]])
        assert torch.all(tokens[rows, longest[g]:] == 0)  # only padding was cut
        # response token t of row i sits at the logits predicting it: position plen_i - 1 + t
        frame_ids = torch.zeros(2, longest[g], dtype=torch.int64)
        frame_mask = torch.zeros(2, longest[g], dtype=torch.bool)
        frame_teacher = torch.zeros(2, longest[g])
        for k, i in enumerate(rows):
            at = slice(int(plen[i]) - 1, int(plen[i]) - 1 + int(rlen[i]))
            frame_ids[k, at], frame_mask[k, at] = ids[i, :rlen[i]], True
            frame_teacher[k, at] = inputs.teacher["teacher_logprobs"][i, :rlen[i]]
            assert torch.equal(mb.tokens[k, at.start + 1:at.stop + 1], ids[i, :rlen[i]])  # the tokens predicted
        assert torch.equal(mb.extra["response_ids"], frame_ids)
        assert torch.equal(mb.extra["response_mask"], frame_mask)
        assert torch.equal(mb.extra["teacher_logprobs"], frame_teacher)
        assert torch.equal(mb.extra["group_ids"], torch.zeros(2, dtype=torch.int64))
    assert [mb.tokens.shape[1] for mb in micro_batches(inputs, 2)] == [width] * 3  # trim=False: as before


def test_token_budget_packs_whole_groups():
    import torch

    from scope_megatron.training.step import _pack_groups

    # rows sorted longest group first: groups 5 (3 rows), 2, 7, 1 (2 rows each)
    groups = [5, 5, 5, 2, 2, 7, 7, 1, 1]
    lengths = [30, 29, 12, 20, 18, 10, 9, 4, 3]
    order = torch.arange(9)
    chunks = [c.tolist() for c in _pack_groups(order, groups, lengths, 100, 1)]
    assert chunks == [[0, 1, 2], [3, 4, 5, 6], [7, 8]]  # 3x30=90; 4x20=80 (+2 would be 120); 2x4
    assert [c.tolist() for c in _pack_groups(order, groups, lengths, 10, 1)] == [[0, 1, 2], [3, 4], [5, 6], [7, 8]]
    assert [c.tolist() for c in _pack_groups(order, groups, lengths, 10**6, 1)] == [list(range(9))]
    # widths rounded up to a multiple of 8 count: 3x32; 4x24=96 > 88 so 2x24; 4x16=64
    assert [c.tolist() for c in _pack_groups(order, groups, lengths, 88, 8)] == [[0, 1, 2], [3, 4], [5, 6, 7, 8]]


def test_token_budget_needs_no_pipeline_parallelism():
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch needs pipeline_model_parallel_size 1"):
        load_config(["--max-tokens-per-micro-batch", "4096", "--pipeline-model-parallel-size", "2"])
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch must be an integer >= 0"):
        load_config(["--max-tokens-per-micro-batch", "-1"])


@pytest.mark.parametrize("trim,max_tokens", [(False, 0), (True, 0), (True, 40)])
def test_micro_batches_that_cut_groups_cover_every_row_and_count_each_group_once(trim, max_tokens, gen):
    """micro_batches(split_groups=True) on rollouts of unequal lengths: every row exactly once, a
    micro-batch's rows group by group (its group ids renumbered 0.. in order), and each group
    owned by exactly one micro-batch (the owned counts sum to the groups)."""
    import torch

    from scope_megatron.rollout.types import Rollouts
    from scope_megatron.training.step import build_inputs, micro_batches

    groups, n = 5, 3
    rows = groups * n
    # the j-th rollout of every group has response length 8 - j: ordered by length (trim), the
    # groups interleave, so every split below cuts some group
    lengths = (8 - torch.arange(n)).repeat(groups)
    mask = torch.arange(8).unsqueeze(0) < lengths.unsqueeze(1)
    rollouts = Rollouts(prompt_ids=torch.randint(1, 9, (rows, 4), generator=gen),
                        prompt_lengths=torch.full((rows,), 3),
                        response_ids=torch.where(mask, torch.randint(1, 9, (rows, 8), generator=gen), 0),
                        response_mask=mask, logprobs=torch.where(mask, -1.0, 0.0),
                        group_ids=torch.arange(groups).repeat_interleave(n),
                        finished=torch.ones(rows, dtype=torch.bool))
    inputs = build_inputs(rollouts, torch.rand(rows, generator=gen) > 0.5, pad_id=0)
    batches = micro_batches(inputs, 5 if not max_tokens else 1, trim=trim, max_tokens=max_tokens,
                            split_groups=True)
    seen = torch.cat([mb.extra["rows"] for mb in batches])
    assert sorted(seen.tolist()) == list(range(rows))
    assert sum(int(mb.extra["owned_groups"]) for mb in batches) == groups
    assert [int(mb.extra["owned_groups"]) for mb in batches] == [mb.extra["owned_groups_int"] for mb in batches]
    holders = [sum(g in mb.extra["step_group_ids"].tolist() for mb in batches) for g in range(groups)]
    assert max(holders) > 1, holders  # some group is cut
    for mb in batches:
        step_groups = mb.extra["step_group_ids"]
        assert torch.equal(step_groups, inputs.group_ids[mb.extra["rows"]])
        _, renumbered = torch.unique_consecutive(step_groups, return_inverse=True)
        assert torch.equal(mb.extra["group_ids"], renumbered), (step_groups, mb.extra["group_ids"])
        assert len(set(step_groups.tolist())) == int(renumbered.max()) + 1  # each group's rows together
        assert torch.equal(mb.extra["correct"], inputs.correct[mb.extra["rows"]])
