"""Rollouts and teacher scores from SGLang servers over HTTP (sglang itself is optional: only
TensorWeightSync's default serializer and launching need it installed).

  SGLangClient, SGLangError, SGLangBadRequest   HTTP client: retries, bounded concurrency,
                                                several servers (client.py)
  SGLangServers                                 attach to / launch and stop servers (servers.py)
  SGLangEngine                                  RolloutEngine over the servers (engine.py)
  DiskWeightSync, TensorWeightSync, DistributedWeightSync
                                                weight sync strategies (weight_sync.py)
  SGLangTeacher, TeacherScores                  teacher log-probs of rollouts (teacher.py)
  TokenizerMismatch                             a teacher server whose tokenizer is not the student's
  logprob_gap, check_logprobs                   engine-vs-trainer log-prob consistency
"""
from .client import ResponseInvalid, SGLangBadRequest, SGLangClient, SGLangError
from .consistency import check_logprobs, logprob_gap
from .engine import SGLangEngine, sampling_payload, sampling_seed
from .servers import SGLangServers
from .teacher import SGLangTeacher, TeacherScores, TokenizerMismatch
from .weight_sync import (DiskWeightSync, DistributedWeightSync, TensorWeightSync, WeightSync,
                          compare_weights, init_weight_update_group, weight_version)

__all__ = [
    "SGLangClient", "SGLangError", "SGLangBadRequest", "ResponseInvalid", "SGLangServers", "SGLangEngine",
    "sampling_payload", "sampling_seed", "WeightSync", "DiskWeightSync", "TensorWeightSync",
    "DistributedWeightSync", "compare_weights", "init_weight_update_group", "weight_version", "SGLangTeacher",
    "TeacherScores", "TokenizerMismatch", "logprob_gap", "check_logprobs",
]
