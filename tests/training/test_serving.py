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


def test_a_served_teacher_at_another_temperature_is_a_config_error_before_any_server():
    """SGLang's prompt log-probs are at temperature 1. A loss that wants the teacher at another
    temperature (e.g. scope.student_temperature 0.6 set to match rollout.temperature for the PPO
    ratio, which teacher_temperature follows by default) is refused on every rank, naming the flag,
    before servers are launched or attached (the config is not even read)."""
    from scope_megatron.utils.config_io import ConfigError

    with pytest.raises(ConfigError, match="--scope-teacher-temperature 1"):
        serving.SGLangTeacherScorer(None, pad_id=0, temperature=0.6)
