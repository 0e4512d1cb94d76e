"""SGLangTeacher: the teacher's log-probs of each rollout's sampled tokens, from an SGLang server
that serves the teacher (prompt scoring, no generation).

Request, per rollout: POST /generate {input_ids: prompt + response, sampling_params:
{max_new_tokens: 0, temperature: 1.0}, return_logprob: true, logprob_start_len: P - 1,
top_logprobs_num: k (if asked)}.

Alignment (sglang's scheduler logprob processor, _process_input_token_logprobs): with
logprob_start_len = s the answer's input_token_logprobs holds one [logprob, token_id, text]
triple per input token from position s on, and the first one's logprob is null (the logits that
predict token s were not computed); triple j > 0 is log p(token s+j | tokens < s+j). With s = P - 1
(P = prompt length >= 1) the answer has 1 + L triples and triples 1..L are exactly the L response
tokens'. input_top_logprobs is aligned the same way (first entry null).

Validation: exactly 1 + L triples, their token ids equal the response, every value finite and
<= 0 (a hair above 0 is clamped), top-k entries complete. A short or malformed answer is retried
and then raises SGLangError: a missing teacher log-prob is never replaced by 0.

Temperature: SGLang computes prompt (input) log-probs from the raw logits: LogitsMetadata's
temp_scaled_logprobs is False for ordinary requests, so sampling_params.temperature does not
change them. The teacher's log-probs are therefore at temperature 1, which is what the SCOPE /
OPD losses compare the student against (the student's trainer-side log-probs at its sampling
temperature are a separate quantity). A teacher temperature other than 1 is refused unless the
server is known to scale them (server_scales_temperature=True, e.g. a patched SGLang), in which
case the temperature is sent in sampling_params.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..types import Rollouts
from .client import ResponseInvalid, SGLangClient, SGLangError

_SLACK = 1e-4


@dataclass(frozen=True)
class TeacherScores:
    """logprobs: [B, L] float32, log p_teacher(response token), 0 where the mask is False.
    top_ids, top_logprobs: [B, L, k] (int64, float32) the teacher's k most likely tokens at each
    response position (pad_id / 0 where the mask is False), or None without top_logprobs_num."""

    logprobs: torch.Tensor
    top_ids: Optional[torch.Tensor] = None
    top_logprobs: Optional[torch.Tensor] = None


def _value(v: Any, where: str) -> float:
    if v is None:
        raise ResponseInvalid(f"{where}: null log-prob")
    x = float(v)
    if not math.isfinite(x) or x > _SLACK:
        raise ResponseInvalid(f"{where}: log-prob {x}")
    return min(x, 0.0)


def parse_scores(answer: Any, response: Sequence[int], top_k: int) -> Tuple[List[float], Optional[list], Optional[list]]:
    """(log-probs of `response`, top ids, top log-probs) from a scoring answer (see the module
    docstring); raises ResponseInvalid when the answer does not have them exactly."""
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if not isinstance(answer, dict) or not isinstance(answer.get("meta_info"), dict):
        raise ResponseInvalid("an answer without meta_info")
    meta = answer["meta_info"]
    if isinstance(meta.get("finish_reason"), dict) and meta["finish_reason"].get("type") == "abort":
        raise ResponseInvalid(f"the server aborted the request: {meta['finish_reason'].get('message', '')}")
    triples = meta.get("input_token_logprobs")
    length = len(response)
    if not isinstance(triples, list) or len(triples) != length + 1:
        got = len(triples) if isinstance(triples, list) else None
        raise ResponseInvalid(f"{got} input log-probs for {length} response tokens (expected {length + 1}, "
                              "the first null)")
    values, relabeled = [], []
    for j, (tok, tri) in enumerate(zip(response, triples[1:])):
        if not isinstance(tri, (list, tuple)) or len(tri) < 2:
            raise ResponseInvalid(f"response token {j}: triple {tri!r}")
        if int(tri[1]) != int(tok):
            # SGLang 0.5.21 sometimes labels a scored input token as id 0 while its value is the
            # right token's (checked against the model, tests/rollout/test_sglang_real.py); any
            # other label, or many of them (a shifted alignment), is an invalid answer
            if int(tri[1]) != 0:
                raise ResponseInvalid(f"response token {j}: log-prob of token {tri[1]}, the response has {tok}")
            relabeled.append(j)
        values.append(_value(tri[0], f"response token {j}"))
    if len(relabeled) > max(1, length // 8):
        raise ResponseInvalid(f"{len(relabeled)} of {length} response tokens are labeled id 0 in the log-probs; "
                              "the answer is not aligned with the response")
    if relabeled:
        _note_relabeled(len(relabeled))
    if top_k <= 0:
        return values, None, None
    tops = meta.get("input_top_logprobs")
    if not isinstance(tops, list) or len(tops) != length + 1:
        raise ResponseInvalid(f"input_top_logprobs has {len(tops) if isinstance(tops, list) else None} "
                              f"entries for {length} response tokens (expected {length + 1})")
    top_ids, top_vals = [], []
    for j, entry in enumerate(tops[1:]):
        if not isinstance(entry, list) or len(entry) < top_k:
            raise ResponseInvalid(f"response position {j}: {len(entry) if isinstance(entry, list) else entry!r} "
                                  f"top log-probs, expected {top_k}")
        top_vals.append([_value(e[0], f"top log-prob at {j}") for e in entry[:top_k]])
        top_ids.append([int(e[1]) for e in entry[:top_k]])
    for j in relabeled:  # where the top-k holds the response token, its value must agree
        if response[j] in top_ids[j]:
            other = top_vals[j][top_ids[j].index(response[j])]
            if abs(other - values[j]) > 1e-3 * max(1.0, abs(other)):
                raise ResponseInvalid(f"response token {j} (labeled 0): log-prob {values[j]} but its top-k "
                                      f"entry says {other}")
    return values, top_ids, top_vals


_RELABELED = {"tokens": 0, "warned": False}


def _note_relabeled(count: int) -> None:
    _RELABELED["tokens"] += count
    if not _RELABELED["warned"]:
        _RELABELED["warned"] = True
        warnings.warn(f"the SGLang teacher labeled {count} scored response token(s) as id 0 in "
                      "input_token_logprobs (a known SGLang reporting quirk; the values are used, the labels "
                      "ignored); shown once", stacklevel=3)


class SGLangTeacher:
    """Teacher log-probs of rollouts from SGLang server(s) serving the teacher.

    client: an SGLangClient over the teacher's servers.
    top_logprobs_num: also return the teacher's top-k per response position (0: none).
    temperature: 1.0 (see the module docstring); another value needs server_scales_temperature.
    pad_id: fills top_ids where the mask is False.
    """

    def __init__(self, client: SGLangClient, *, top_logprobs_num: int = 0, temperature: float = 1.0,
                 server_scales_temperature: bool = False, pad_id: int = 0,
                 request_timeout: Optional[float] = None):
        if temperature <= 0:
            raise ValueError(f"SGLangTeacher: temperature must be > 0, got {temperature}")
        if temperature != 1.0 and not server_scales_temperature:
            raise ValueError("SGLangTeacher: SGLang's prompt log-probs are at temperature 1 whatever "
                             "sampling_params.temperature says; a teacher temperature other than 1 needs a "
                             "server that scales them (server_scales_temperature=True)")
        if top_logprobs_num < 0:
            raise ValueError("SGLangTeacher: top_logprobs_num must be >= 0")
        self.client = client
        self.top_logprobs_num = int(top_logprobs_num)
        self.temperature = float(temperature)
        self.pad_id = int(pad_id)
        self.request_timeout = request_timeout

    def payload(self, prompt: Sequence[int], response: Sequence[int]) -> dict:
        if len(prompt) == 0 or len(response) == 0:
            raise ValueError("SGLangTeacher: prompt and response need >= 1 token each")
        body = {
            "input_ids": [int(t) for t in prompt] + [int(t) for t in response],
            "sampling_params": {"max_new_tokens": 0, "temperature": self.temperature},
            "return_logprob": True,
            "logprob_start_len": len(prompt) - 1,
        }
        if self.top_logprobs_num:
            body["top_logprobs_num"] = self.top_logprobs_num
        return body

    def score_sequences(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list:
        """Per pair: (log-probs, top ids, top log-probs) as lists (see parse_scores)."""
        if len(prompts) != len(responses):
            raise ValueError("SGLangTeacher: prompts and responses differ in number")
        out: List[Optional[tuple]] = [None] * len(prompts)

        def validate(i, answer):
            out[i] = parse_scores(answer, responses[i], self.top_logprobs_num)

        self.client.map("/generate", [self.payload(p, r) for p, r in zip(prompts, responses)], validate=validate,
                        desc="teacher", timeout=self.request_timeout)
        return out

    def score(self, rollouts: Rollouts) -> TeacherScores:
        """Teacher log-probs aligned with rollouts.response_ids ([B, L], 0 where masked out)."""
        mask = rollouts.response_mask.cpu()
        lengths = rollouts.prompt_lengths.cpu().tolist()
        prompts = [row[:n].tolist() for row, n in zip(rollouts.prompt_ids.cpu(), lengths)]
        responses = [ids[m].tolist() for ids, m in zip(rollouts.response_ids.cpu(), mask)]
        scored = self.score_sequences(prompts, responses)
        rows, width = mask.shape
        logprobs = torch.zeros(rows, width, dtype=torch.float32)
        k = self.top_logprobs_num
        top_ids = torch.full((rows, width, k), self.pad_id, dtype=torch.int64) if k else None
        top_lp = torch.zeros(rows, width, k, dtype=torch.float32) if k else None
        for r, (values, ids, vals) in enumerate(scored):
            positions = torch.nonzero(mask[r]).flatten()
            if positions.numel() != len(values):
                raise SGLangError(f"rollout {r}: {len(values)} teacher log-probs for {positions.numel()} tokens")
            logprobs[r, positions] = torch.tensor(values, dtype=torch.float32)
            if k:
                top_ids[r, positions] = torch.tensor(ids, dtype=torch.int64)
                top_lp[r, positions] = torch.tensor(vals, dtype=torch.float32)
        d = rollouts.response_ids.device
        return TeacherScores(logprobs=logprobs.to(d), top_ids=None if top_ids is None else top_ids.to(d),
                             top_logprobs=None if top_lp is None else top_lp.to(d))
