"""ScopeConfig: defaults, invalid values and combinations fail early naming the field and fix."""
import dataclasses

import pytest

from scope_megatron.scope import ScopeConfig


def test_defaults_are_the_paper():
    c = ScopeConfig()
    assert (c.algorithm, c.routing, c.student_path, c.teacher_path) == ("scope", True, "weighted", "weighted")
    assert (c.flip_student_direction, c.flip_teacher_direction, c.tau, c.normalize) == (False, False, 1.0, "sum")
    assert (c.kl_estimator, c.clip_eps, c.old_logprobs) == ("full", 0.2, "rollout")
    assert c.student_temperature == 1.0 and c.teacher_temperature is None
    assert c.resolved_teacher_temperature == 1.0
    assert ScopeConfig(student_temperature=0.6).resolved_teacher_temperature == 0.6
    assert ScopeConfig(student_temperature=0.6, teacher_temperature=1.0).resolved_teacher_temperature == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(algorithm="ppo"), r"algorithm must be one of \('scope', 'opd', 'grpo'\)"),
    (dict(student_path="on"), "student_path must be one of"),
    (dict(teacher_path=None), "teacher_path must be one of"),
    (dict(normalize="softmax"), "normalize must be one of"),
    (dict(kl_estimator="k2"), "kl_estimator must be one of"),
    (dict(old_logprobs="trainer"), "old_logprobs must be one of"),
    (dict(tau=0.0), "tau must be a finite number > 0"),
    (dict(tau=float("inf")), "tau must be a finite number > 0"),
    (dict(student_temperature=-1.0), "student_temperature must be a finite number > 0"),
    (dict(teacher_temperature=float("nan")), "teacher_temperature must be a finite number > 0"),
    (dict(kl_estimator="sampled", clip_eps=1.0), r"clip_eps must be in \(0, 1\)"),
    (dict(kl_estimator="topk", topk_k=0), "topk_k must be an integer >= 1"),
    (dict(kl_estimator="topk", topk_k=2.5), "topk_k must be an integer >= 1"),
    (dict(routing="yes"), "routing must be a bool"),
])
def test_invalid_values(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ScopeConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(student_path="off", teacher_path="off"), "both 'off'"),
    (dict(routing=False), "routing=False .* set student_path='off'"),
    (dict(routing=False, student_path="off", teacher_path="off"), "both 'off'"),
])
def test_invalid_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScopeConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(topk_k=8), "topk_k"),                                        # only for "topk"
    (dict(kl_estimator="k3", clip_eps=0.3), "clip_eps"),                # only for "sampled"/GRPO
    (dict(kl_estimator="full", old_logprobs="recomputed"), "old_logprobs"),
    (dict(student_path="uniform", teacher_path="uniform", tau=2.0), "tau"),
    (dict(student_path="uniform", flip_student_direction=True), "flip_student_direction"),
    (dict(teacher_path="off", kl_estimator="k3"), "kl_estimator"),
    (dict(teacher_path="off", teacher_temperature=1.0), "teacher_temperature"),
    (dict(algorithm="opd", student_path="uniform"), "student_path"),
    (dict(algorithm="opd", tau=0.5), "tau"),
    (dict(algorithm="grpo", kl_estimator="k3"), "kl_estimator"),
    (dict(algorithm="grpo", teacher_temperature=1.0), "teacher_temperature"),
    (dict(algorithm="grpo", routing=False), "routing"),
])
def test_fields_without_effect_are_errors(kwargs, field):
    with pytest.raises(ValueError, match=f"ScopeConfig.{field}=.* has no effect"):
        ScopeConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(algorithm="opd"),
    dict(algorithm="opd", kl_estimator="topk", topk_k=16, teacher_temperature=1.0),
    dict(algorithm="grpo", clip_eps=0.28, old_logprobs="recomputed", normalize="mean"),
    dict(student_path="uniform", teacher_path="uniform"),                   # pure routing
    dict(teacher_path="uniform"), dict(student_path="uniform"),             # one weighted path
    dict(flip_student_direction=True, flip_teacher_direction=True),         # flipped directions
    dict(tau=0.5), dict(tau=4.0),                                           # tau sweep
    dict(routing=False, student_path="off", teacher_path="uniform"),        # = OPD
    dict(teacher_path="off"), dict(student_path="off", kl_estimator="sampled", clip_eps=0.1),
    dict(kl_estimator="sampled", normalize="mean", flip_student_direction=True,  # reference code
         student_temperature=0.6, teacher_temperature=1.0),
])
def test_baselines_and_ablations_are_expressible(kwargs):
    cfg = ScopeConfig(**kwargs)
    assert dataclasses.replace(cfg) == cfg


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ScopeConfig().tau = 2.0
