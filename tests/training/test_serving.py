"""scope_megatron.training.serving: what the trainer wraps around SGLang (the replica engine that
shares a leader's rollouts with its model-parallel peers, the served teacher's setup)."""
import tempfile

import pytest
import torch
import torch.distributed as dist

from scope_megatron.rollout import RolloutEngine, Rollouts, SamplingParams
from scope_megatron.training import serving


class _CpuEngine(RolloutEngine):
    """What SGLangEngine gives the trainer: Rollouts on the CPU (device='cpu' in SGLangRollouts)."""

    def generate(self, prompts, params, *, key=0):
        rows, width = len(prompts) * params.n, 3
        return Rollouts(prompt_ids=torch.ones(rows, 2, dtype=torch.int64),
                        prompt_lengths=torch.full((rows,), 2, dtype=torch.int64),
                        response_ids=torch.full((rows, width), 5, dtype=torch.int64),
                        response_mask=torch.ones(rows, width, dtype=torch.bool),
                        logprobs=torch.full((rows, width), -0.5),
                        group_ids=torch.arange(rows) // params.n,
                        finished=torch.ones(rows, dtype=torch.bool))

    def update_weights(self, step=None):
        pass


@pytest.fixture
def one_rank_group(monkeypatch):
    """A world of one process whose model-parallel group is itself (TP = PP = 1, data parallel
    only: the usual layout for small students)."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        monkeypatch.setattr(serving, "model_parallel_group", lambda: dist.group.WORLD)
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_replica_rollouts_reach_the_training_device_without_model_parallel_peers(one_rank_group):
    """With TP = PP = 1 nothing is broadcast, but the rollouts must still move from the engine's
    CPU tensors to the trainer's device (the student's forward reads them there; on a GPU a CPU
    batch is a device-mismatch error at the first step). 'meta' stands in for the GPU."""
    device = torch.device("meta")
    engine = serving.ReplicaEngine(_CpuEngine(), device)
    out = engine.generate([[1, 2], [1, 3]], SamplingParams(n=2, max_new_tokens=3))
    for name in serving._ROLLOUT_FIELDS:
        assert getattr(out, name).device == device, name
    scores = serving.broadcast_tensors({"teacher_logprobs": torch.zeros(4, 3)}, device)
    assert scores["teacher_logprobs"].device == device


def _teacher_cfg(url, log_dir, *flags):
    from scope_megatron.training.config import load_config

    return load_config(["--teacher-engine", "sglang", "--teacher-serving-sglang-urls", url, "--teacher-load", "null",
                        "--scope-kl-estimator", "k3", "--scope-teacher-temperature", "1", "--log-dir", str(log_dir),
                        *flags])


def _scorer(cfg):
    """The scorer as the trainer builds it: the task's tokenizer, the loss's teacher temperature."""
    from scope_megatron.training.tasks import build_task

    return serving.SGLangTeacherScorer(cfg, pad_id=0, temperature=cfg.scope.resolved_teacher_temperature,
                                       tokenizer=build_task(cfg).tokenizer)


def _other_tokenizer_dir(dst):
    """The toy model served with the toy symbols in reverse order: another tokenizer."""
    from scope_megatron.data.toy_arithmetic import ToyArithmetic
    from tests.rollout.fake_sglang_server import retokenized_copy, toy_hf_dir

    return retokenized_copy(toy_hf_dir(), dst, ToyArithmetic().tokenizer.tokens[3:][::-1])


def test_the_served_teachers_tokenizer_is_checked_when_the_scorer_is_built(one_rank_group, tmp_path, monkeypatch):
    """The scorer probes the teacher once with the task's tokenizer (the toy world's here): the
    same tokenizer passes; another one is an error naming both, and the scorer it would have been
    closes its client."""
    from scope_megatron.rollout.sglang.teacher import TokenizerMismatch
    from tests.rollout.fake_sglang_server import FakeSGLangServer, toy_hf_dir

    with FakeSGLangServer(toy_hf_dir()) as same, FakeSGLangServer(_other_tokenizer_dir(tmp_path / "t")) as other:
        scorer = _scorer(_teacher_cfg(same.url, tmp_path / "logs"))
        assert scorer.tokenizer_verdict == {same.url: "ok"}
        assert [b["return_text_in_logprobs"] for b in same.calls_to("/generate")] == [True]
        scorer.close()
        closed, original = [], serving._Served.close
        monkeypatch.setattr(serving._Served, "close", lambda self: (closed.append(self), original(self)))
        want = (r"student tokenizer CharTokenizer \(18 ids\); "
                r"teacher server\(s\) http://127\.0\.0\.1:\d+ \(.*/t\): 14 of 18")
        with pytest.raises(TokenizerMismatch, match=want):
            _scorer(_teacher_cfg(other.url, tmp_path / "logs"))
        assert len(closed) == 1
        # the user's way out: no probe at all
        calls = len(other.calls_to("/generate"))
        unchecked = _scorer(_teacher_cfg(other.url, tmp_path / "logs", "--teacher-serving-check-tokenizer", "false"))
        assert unchecked.tokenizer_verdict is None and len(other.calls_to("/generate")) == calls
        unchecked.close()


def scorer_ranks(ctx):
    """Worker (2 gloo ranks, DP = 2: each rank its own replica leader): only global rank 0 probes;
    the verdict reaches rank 1, and so does a mismatch, as an error there too."""
    import pathlib
    import tempfile

    from tests.rollout.fake_sglang_server import FakeSGLangServer, toy_hf_dir

    groups = [dist.new_group([0]), dist.new_group([1])]
    serving.model_parallel_group = lambda: groups[dist.get_rank()]
    tmp = pathlib.Path(tempfile.mkdtemp())
    servers, urls = [], [None]
    if ctx.rank == 0:
        servers = [FakeSGLangServer(toy_hf_dir()).start(), FakeSGLangServer(_other_tokenizer_dir(tmp / "t")).start()]
        urls[0] = [s.url for s in servers]
    dist.broadcast_object_list(urls, src=0)
    out = {}
    try:
        scorer = _scorer(_teacher_cfg(urls[0][0], tmp))
        out["verdict"] = scorer.tokenizer_verdict
        out["has_client"] = scorer.client is not None
        scorer.close()
        try:
            _scorer(_teacher_cfg(urls[0][1], tmp))
            out["error"] = None
        except Exception as exc:
            out["error"] = [type(exc).__name__, str(exc)]
        out["probes"] = [len(s.calls_to("/generate")) for s in servers]
    finally:
        for s in servers:
            s.stop()
    out["urls"] = urls[0]
    return out


def test_a_tokenizer_mismatch_stops_every_rank():
    from tests.conftest import SESSION_SEED
    from tests.distributed import run_workers

    r0, r1 = run_workers("tests.training.test_serving:scorer_ranks", 2, seed=SESSION_SEED, timeout=240)
    same, other = r0["urls"]
    assert r0["verdict"] == r1["verdict"] == {same: "ok"}
    assert r0["has_client"] and r1["has_client"]  # both lead a replica, one probe in all
    assert r0["probes"] == [1, 1]
    assert r0["error"][0] == "TokenizerMismatch" and other in r0["error"][1]
    assert r1["error"][0] == "SGLangError"
    assert r1["error"][1].startswith("the teacher tokenizer check failed on rank 0: TokenizerMismatch: ")
    assert other in r1["error"][1] and "14 of 18 probed ids decode differently" in r1["error"][1]
