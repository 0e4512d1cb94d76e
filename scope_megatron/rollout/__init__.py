"""Rollout engines: sample the student's responses to prompts.

  SamplingParams, Rollouts, RolloutEngine   the engine interface (types.py)
  LocalEngine, DecodingModel, IncrementalDecodingModel
                                            sampling from the trainer's own model (local.py)
  sample_tokens                             temperature / top-k / top-p / greedy sampling
"""
from .local import DecodingModel, IncrementalDecodingModel, LocalEngine
from .sampling import sample_tokens
from .types import RolloutEngine, Rollouts, SamplingParams

__all__ = ["SamplingParams", "Rollouts", "RolloutEngine", "LocalEngine", "DecodingModel", "IncrementalDecodingModel", "sample_tokens"]
