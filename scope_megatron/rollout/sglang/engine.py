"""SGLangEngine: rollouts sampled by SGLang servers, behind the RolloutEngine interface.

Requests. One HTTP request per prompt, carrying its n samples as a batch of n items (input_ids
repeated, one sampling_params dict per sample) rather than SGLang's `n`: SGLang expands `n`
into copies of one request with the SAME sampling_seed, which would give n identical rollouts
under deterministic inference; per-sample items get per-sample seeds, and share the prompt's KV
cache through SGLang's radix cache all the same. A prompt is the unit of retry and of load
balancing.

What is sent, per sample (explicit values, so that a model's generation_config or a server's
preferred_sampling_params cannot change the distribution):
  max_new_tokens, temperature (0 = greedy), top_p, top_k (0 -> -1, SGLang's "off"), min_p 0,
  no penalties, n 1, sampling_seed (below), stop_token_ids = params.stop_token_ids, and
  ignore_eos = (no stop_token_ids). SGLang always also stops at the model's EOS ids unless
  ignore_eos; a response stopped by a token outside params.stop_token_ids raises SGLangError
  (put EOS in stop_token_ids). return_logprob true, logprob_start_len -1 (output tokens only).

Log-probs. SGLang's sampler (srt/layers/sampler.py, standard path) returns
log(softmax(logits / T)) of the sampled token, before top-k / top-p / min-p filtering, and
log_softmax(logits) for greedy requests (SGLang maps temperature 0 to greedy with T = 1): exactly
the Rollouts contract (SamplingParams). Two server settings break it: the environment variable
SGLANG_RETURN_ORIGINAL_LOGPROB (log-probs at T = 1; SGLangServers launches without it) and
custom logit processors. The trainer should measure the gap once with logprob_gap /
check_logprobs (consistency.py).

Seeds. sampling_seed of sample j of prompt i is a hash of (params.seed, key, stream_seed, i, j)
(31 bits): the same call gives the same requests. SGLang honours sampling_seed only with
--enable-deterministic-inference (SGLangServers(deterministic=True)); otherwise its sampling is
not reproducible, whatever is sent.

Answers are validated (per prompt, retried when malformed): n items; every item has >= 1 output
token, as many log-prob triples as tokens, the triples' token ids equal output_ids, no null or
positive log-probs, at most max_new_tokens tokens; finish_reason "stop" (finished=True; the
matched stop token is kept, appended if the server trimmed it from output_ids while reporting
its log-prob) or "length" (finished=False); "abort" is retried.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..types import RolloutEngine, Rollouts, SamplingParams
from .client import ResponseInvalid, SGLangClient, SGLangError

# slack for log-probs computed in low precision that come out a hair above 0
_LOGPROB_SLACK = 1e-4


def sampling_seed(params_seed: int, key: int, stream_seed: int, prompt_index: int, sample_index: int) -> int:
    """The sampling_seed of one sample: a 31-bit hash of its coordinates."""
    digest = hashlib.sha256(f"{params_seed}/{key}/{stream_seed}/{prompt_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31 - 1)


def sampling_payload(params: SamplingParams, seed: int) -> Dict[str, Any]:
    """The sampling_params dict of one sample (see the module docstring)."""
    stop = list(params.stop_token_ids)
    return {
        "max_new_tokens": params.max_new_tokens,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": params.top_k if params.top_k > 0 else -1,
        "min_p": 0.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "repetition_penalty": 1.0,
        "n": 1,
        "sampling_seed": int(seed),
        "stop_token_ids": stop,
        "ignore_eos": not stop,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }


def parse_sample(answer: Any, params: SamplingParams) -> Tuple[List[int], List[float], bool]:
    """(token ids, log-probs, finished) of one /generate item. Raises ResponseInvalid for a
    malformed answer (retried) and SGLangError for one that contradicts the request."""
    if not isinstance(answer, dict) or not isinstance(answer.get("meta_info"), dict):
        raise ResponseInvalid("an item without meta_info")
    ids = answer.get("output_ids")
    meta = answer["meta_info"]
    triples = meta.get("output_token_logprobs")
    reason = meta.get("finish_reason")
    if not isinstance(ids, list) or not isinstance(triples, list):
        raise ResponseInvalid("no output_ids or output_token_logprobs (was return_logprob honoured?)")
    if not isinstance(reason, dict) or "type" not in reason:
        raise ResponseInvalid(f"finish_reason {reason!r}")
    kind = reason["type"]
    if kind == "abort":
        raise ResponseInvalid(f"the server aborted the request: {reason.get('message', '')}")
    ids = list(ids)
    if kind == "stop":
        matched = reason.get("matched")
        if not isinstance(matched, int) or isinstance(matched, bool):
            raise SGLangError(f"stopped on {matched!r}, not a stop token id (no stop strings are sent)")
        if matched not in params.stop_token_ids:
            raise SGLangError(f"stopped on token {matched}, which is not in stop_token_ids "
                              f"{list(params.stop_token_ids)}: SGLang also stops at the model's EOS ids "
                              f"unless ignore_eos; add them to SamplingParams.stop_token_ids")
        if (not ids or ids[-1] != matched) and len(triples) == len(ids) + 1:
            ids.append(matched)  # the server trimmed the stop token but reported its log-prob
        if not ids or ids[-1] != matched:
            raise ResponseInvalid(f"finish_reason stop on {matched} but output_ids ends with "
                                  f"{ids[-1] if ids else None}")
        finished = True
    elif kind == "length":
        # SGLang tests the length limit before the stop tokens: a response whose last allowed
        # token is a stop token reports "length", yet it finished (as LocalEngine says).
        finished = bool(ids) and ids[-1] in params.stop_token_ids
    else:
        raise SGLangError(f"unexpected finish_reason {reason!r}")
    if len(ids) == 0:
        raise ResponseInvalid("an empty response")
    if len(ids) > params.max_new_tokens:
        raise SGLangError(f"{len(ids)} tokens returned for max_new_tokens {params.max_new_tokens}")
    if len(triples) != len(ids):
        raise ResponseInvalid(f"{len(triples)} output log-probs for {len(ids)} output tokens")
    logprobs = []
    for k, (t, tri) in enumerate(zip(ids, triples)):
        if not isinstance(tri, (list, tuple)) or len(tri) < 2 or tri[0] is None:
            raise ResponseInvalid(f"output log-prob {k} is {tri!r}")
        if int(tri[1]) != int(t):
            raise ResponseInvalid(f"output log-prob {k} is of token {tri[1]}, output_ids has {t}")
        v = float(tri[0])
        if math.isnan(v) or v > _LOGPROB_SLACK:
            raise ResponseInvalid(f"output log-prob {k} is {v}")
        logprobs.append(min(v, 0.0))
    return ids, logprobs, finished


class SGLangEngine(RolloutEngine):
    """Rollouts from SGLang servers (see the module docstring).

    client: an SGLangClient over the servers (or use SGLangEngine.from_urls).
    pad_id: fills unused positions of the Rollouts tensors.
    weight_sync: the WeightSync strategy update_weights uses (None: update_weights raises).
    weight_version: the version the servers must report with every sample (set by
      update_weights, or by whoever pushes the weights; None: not checked, e.g. before the first
      update). A sample of another version is an SGLangError naming the server.
    stream_seed: mixed into every sampling_seed (e.g. to make two engines' streams differ).
    device: where the Rollouts tensors are put.
    """

    def __init__(self, client: SGLangClient, *, pad_id: int, weight_sync=None, stream_seed: int = 0,
                 device: torch.device | str = "cpu", request_timeout: Optional[float] = None):
        self.client = client
        self.pad_id = int(pad_id)
        self.weight_sync = weight_sync
        self.stream_seed = int(stream_seed)
        self.device = torch.device(device)
        self.request_timeout = request_timeout
        self.weight_version: Optional[str] = None
        self._updates = 0

    @classmethod
    def from_urls(cls, urls: Sequence[str], *, pad_id: int, client_kwargs: Optional[dict] = None, **kw):
        return cls(SGLangClient(urls, **(client_kwargs or {})), pad_id=pad_id, **kw)

    def close(self) -> None:
        self.client.close()

    def payload(self, prompt: Sequence[int], params: SamplingParams, key: int, index: int) -> Dict[str, Any]:
        """The /generate body of prompt `index`: its n samples as a batch."""
        ids = [int(t) for t in prompt]
        return {
            "input_ids": [ids] * params.n,
            "sampling_params": [sampling_payload(params, sampling_seed(params.seed, key, self.stream_seed, index, j))
                                for j in range(params.n)],
            "return_logprob": True,
            "logprob_start_len": -1,
        }

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, key: int = 0) -> Rollouts:
        if len(prompts) == 0:
            raise ValueError("SGLangEngine.generate: no prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("SGLangEngine.generate: an empty prompt; every prompt needs >= 1 token")
        n = params.n
        parsed: List[Optional[list]] = [None] * len(prompts)

        expected = self.weight_version

        def validate(i: int, answer: Any) -> None:
            if not isinstance(answer, list) or len(answer) != n:
                got = len(answer) if isinstance(answer, list) else type(answer).__name__
                raise ResponseInvalid(f"expected a list of {n} items, got {got}")
            if expected is not None:  # after an update: on-policy samples only
                for item in answer:
                    meta = item.get("meta_info") if isinstance(item, dict) else None
                    got = meta.get("weight_version") if isinstance(meta, dict) else None
                    if got is not None and got != expected:
                        raise SGLangError(f"sampled with weight_version {got!r}, but the trainer pushed "
                                          f"{expected!r}: the server restarted or missed an update, so its "
                                          "rollouts would be off-policy. Restart the run (its resume pushes "
                                          "the weights again) or restart that server")
            parsed[i] = [parse_sample(item, params) for item in answer]

        self.client.map("/generate", [self.payload(p, params, key, i) for i, p in enumerate(prompts)],
                        validate=validate, desc="rollouts", timeout=self.request_timeout)
        samples = [s for per_prompt in parsed for s in per_prompt]
        rows = len(samples)
        width = max(len(ids) for ids, _, _ in samples)
        prompt_width = max(len(p) for p in prompts)
        prompt_ids = torch.full((rows, prompt_width), self.pad_id, dtype=torch.int64)
        response_ids = torch.full((rows, width), self.pad_id, dtype=torch.int64)
        response_mask = torch.zeros(rows, width, dtype=torch.bool)
        logprobs = torch.zeros(rows, width, dtype=torch.float32)
        finished = torch.zeros(rows, dtype=torch.bool)
        prompt_lengths = torch.zeros(rows, dtype=torch.int64)
        for r, (ids, lps, fin) in enumerate(samples):
            p = prompts[r // n]
            prompt_ids[r, :len(p)] = torch.tensor([int(t) for t in p], dtype=torch.int64)
            prompt_lengths[r] = len(p)
            response_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
            response_mask[r, :len(ids)] = True
            logprobs[r, :len(ids)] = torch.tensor(lps, dtype=torch.float32)
            finished[r] = fin
        d = self.device
        return Rollouts(prompt_ids=prompt_ids.to(d), prompt_lengths=prompt_lengths.to(d),
                        response_ids=response_ids.to(d), response_mask=response_mask.to(d),
                        logprobs=logprobs.to(d), group_ids=(torch.arange(rows) // n).to(d),
                        finished=finished.to(d))

    def update_weights(self, step: Optional[int] = None) -> None:
        """Pushes the trainer's current weights to every server as weight_version f"step-{step}"
        (collective: call on every trainer rank; see weight_sync.py). step None: a counter."""
        if self.weight_sync is None:
            raise SGLangError("SGLangEngine.update_weights: no weight_sync strategy was given")
        if step is None:
            step = self._updates
        self._updates = int(step) + 1
        self.weight_version = self.weight_sync.update(self.client, int(step))
