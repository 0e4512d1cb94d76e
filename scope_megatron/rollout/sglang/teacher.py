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

Tokenizer: the teacher scores the student's token ids, so both must mean the same strings by them.
`check_tokenizer` (run once before training) sends each teacher server a probe of student ids and
compares the texts the server attaches to them (return_text_in_logprobs: sglang's
tokenizer_manager.detokenize_logprob_tokens decodes each id on its own, batch_decode([[id], ...]))
with the student tokenizer's decode of each single id; any difference raises TokenizerMismatch.
A server that leaves the text slots null (no return_text_in_logprobs) is warned about, not refused.

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..types import Rollouts
from .client import ResponseInvalid, SGLangBadRequest, SGLangClient, SGLangError

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


def _relabeled_too_many(relabeled: int, total: int) -> bool:
    """Whether `relabeled` of `total` scored tokens labeled id 0 instead of their own id is more
    than sglang 0.5.21's quirk explains (it labels a few input tokens 0, with the right value:
    checked against the model, tests/rollout/test_sglang_real.py): more means the answer is not
    aligned with the tokens sent."""
    return relabeled > max(1, total // 8)


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
            # the id-0 quirk (_relabeled_too_many) is tolerated; any other label, or many of them
            # (a shifted alignment), is an invalid answer
            if int(tri[1]) != 0:
                raise ResponseInvalid(f"response token {j}: log-prob of token {tri[1]}, the response has {tok}")
            relabeled.append(j)
        values.append(_value(tri[0], f"response token {j}"))
    if _relabeled_too_many(len(relabeled), length):
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


# -- tokenizer check ----------------------------------------------------------------------------

class TokenizerMismatch(SGLangError):
    """A teacher server's tokenizer is not the student's: its ids mean other strings, so its
    log-probs of the student's tokens would be log-probs of other tokens."""


# multilingual prose, math and code: the student's encoding of it holds common ids of many scripts
PROBE_TEXT = ("The answer is \\boxed{42}. Solve 3x^2 - 5x + 2 = 0: x = (5 ± √1)/6, ∫_0^1 x² dx = 1/3, "
              "α + β ≠ γ.\ndef f(x):\n    return {'k': [x ** 2, \"s\"]}  # code\n"
              "中文：你好，世界。日本語：こんにちは。한국어 Русский Ελληνικά العربية हिन्दी 😀")
PROBE_CHUNK = 32  # ids per probe sequence: shorter than any model's context (the toy model's is 64)
PROBE_MAX_IDS = 256
_PROBE_SPREAD = 64  # ids spread evenly over the student's vocabulary (the last one included)


def _is_hf(tokenizer) -> bool:
    return hasattr(tokenizer, "batch_decode") and hasattr(tokenizer, "convert_ids_to_tokens")


def _vocab_len(tokenizer) -> int:
    if _is_hf(tokenizer):
        return len(tokenizer)
    return int(tokenizer.vocab_size)  # scope_megatron.data.tokenizer.CharTokenizer


def tokenizer_label(tokenizer) -> str:
    """A name for error messages: the HF tokenizer's directory / hub name, else its class."""
    name = getattr(tokenizer, "name_or_path", None)
    kind = type(tokenizer).__name__
    return f"{kind} {name}" if name else f"{kind} ({_vocab_len(tokenizer)} ids)"


def tokenizer_probe_ids(tokenizer, max_ids: int = PROBE_MAX_IDS) -> List[int]:
    """Student ids to probe a teacher with: the encoding of PROBE_TEXT, the special / added ids
    (bos, eos, pad, chat-template tokens) and ids spread over the whole vocabulary, all < the
    student tokenizer's length."""
    n = _vocab_len(tokenizer)
    if n <= 0:
        raise ValueError("the student tokenizer has no ids")
    special: List[int] = []
    if _is_hf(tokenizer):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            v = getattr(tokenizer, name, None)
            if isinstance(v, int):
                special.append(v)
        special += [int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])]
        special += sorted(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))[:32]
    else:
        special += [int(getattr(tokenizer, a)) for a in ("bos_id", "eos_id", "pad_id") if hasattr(tokenizer, a)]
    if n <= _PROBE_SPREAD:
        spread = list(range(n))
    else:
        spread = sorted({round(k * (n - 1) / (_PROBE_SPREAD - 1)) for k in range(_PROBE_SPREAD)})
    try:
        text = (tokenizer.encode(PROBE_TEXT, add_special_tokens=False, verbose=False) if _is_hf(tokenizer)
                else tokenizer.encode(PROBE_TEXT))
    except (ValueError, KeyError):  # a small fixed vocabulary (the toy world's) cannot encode it
        text = []
    extra, seen = [], set()
    for i in special + spread:
        if 0 <= i < n and i not in seen:
            seen.add(i)
            extra.append(i)
    # each id once: a repeated one would be sent again and compared once (compare_probe)
    text = [i for i in dict.fromkeys(int(i) for i in text) if 0 <= i < n and i not in seen]
    ids = text[:max(0, max_ids - len(extra))] + extra
    return ids[:max_ids]


def student_token_texts(tokenizer, ids: Sequence[int]) -> Dict[int, Tuple[str, ...]]:
    """{id: the texts accepted for it}: the student's decode of the single id as SGLang decodes a
    logprob token (batch_decode([[id], ...]), special tokens kept); with and without
    clean_up_tokenization_spaces too, a default that differs between transformers versions."""
    ids = sorted({int(i) for i in ids})
    if not _is_hf(tokenizer):
        return {i: (tokenizer.decode([i], skip_special=False),) for i in ids}
    singles = [[i] for i in ids]
    variants = [tokenizer.batch_decode(singles, clean_up_tokenization_spaces=cleanup) for cleanup in (True, False)]
    return {i: tuple(dict.fromkeys(v[k] for v in variants)) for k, i in enumerate(ids)}


def probe_payload(ids: Sequence[int], chunk: int = PROBE_CHUNK) -> dict:
    """One /generate over the probe ids cut into sequences of <= chunk ids: the log-prob triples of
    every input token with their texts (no generation)."""
    ids = [int(i) for i in ids]
    return {
        "input_ids": [ids[k:k + chunk] for k in range(0, len(ids), chunk)],
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "return_text_in_logprobs": True,
    }


def parse_probe(answer: Any, chunks: Sequence[Sequence[int]]) -> List[Tuple[int, int, Optional[str]]]:
    """(sent id, id the server labeled, the server's text or None) per probe token; raises
    ResponseInvalid when the answer does not hold one triple per sent token."""
    items = answer if isinstance(answer, list) else [answer]
    if len(items) != len(chunks):
        raise ResponseInvalid(f"{len(items)} answers for {len(chunks)} probe sequences")
    out = []
    for c, (item, chunk) in enumerate(zip(items, chunks)):
        meta = item.get("meta_info") if isinstance(item, dict) else None
        triples = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
        if not isinstance(triples, list) or len(triples) != len(chunk):
            got = len(triples) if isinstance(triples, list) else None
            raise ResponseInvalid(f"probe sequence {c}: {got} input log-probs for {len(chunk)} tokens")
        for tok, tri in zip(chunk, triples):
            if not isinstance(tri, (list, tuple)) or len(tri) < 2:
                raise ResponseInvalid(f"probe sequence {c}: triple {tri!r}")
            text = tri[2] if len(tri) > 2 else None
            out.append((int(tok), int(tri[1]), text if isinstance(text, str) else None))
    return out


def compare_probe(probed: Sequence[Tuple[int, int, Optional[str]]],
                  expected: Dict[int, Tuple[str, ...]]) -> Optional[List[Tuple[int, Tuple[str, ...], str]]]:
    """The probe tokens whose server text is not the student's: [(id, student texts, server text)];
    None when the server gave no texts at all (it does not support return_text_in_logprobs).
    Raises SGLangError when more tokens are labeled id 0 than sglang's quirk explains
    (_relabeled_too_many): their texts are id 0's, so too few ids were compared as themselves."""
    if all(text is None for _, _, text in probed):
        return None
    relabeled = sum(1 for sent, label, _ in probed if label == 0 != sent)
    if _relabeled_too_many(relabeled, len(probed)):
        raise SGLangError(f"{relabeled} of {len(probed)} tokenizer probe tokens came back labeled id 0 (their texts "
                          "are id 0's), too many to verify the tokenizer: the answer is not aligned with the ids sent")
    bad, seen = [], set()
    for sent, label, text in probed:
        # the id the text belongs to: the label (sglang 0.5.21 may label an input token 0)
        tok = label if label in (sent, 0) else sent
        if tok in seen:
            continue
        seen.add(tok)
        want = expected.get(tok)
        if want is None or text is None or text not in want or label not in (sent, 0):
            bad.append((tok, want or (), "<none>" if text is None else text))
    return bad


def _server_tokenizer(client: SGLangClient, url: str) -> str:
    """The server's tokenizer path (or model path) from /model_info, best effort."""
    for path in ("/model_info", "/get_model_info"):
        try:
            info = client.request("GET", path, url=url, retries=0, timeout=10)
        except SGLangError:
            continue
        if isinstance(info, dict):
            name = info.get("tokenizer_path") or info.get("model_path")
            if name:
                return str(name)
    return "tokenizer unknown"


_UNVERIFIED_WARNED = {"warned": False}


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

    def check_tokenizer(self, tokenizer, *, student: Optional[str] = None, examples: int = 5) -> Dict[str, str]:
        """Checks once, before any scoring, that every teacher server decodes the student's ids as
        the student tokenizer does (see the module docstring). Returns {url: "ok" | "unverified"}
        ("unverified": the server gave no token texts; a warning says so once). Raises
        TokenizerMismatch naming both tokenizers and the servers, with examples, when any server's
        texts differ, or when a server rejects the student's ids (e.g. ids beyond its vocabulary)."""
        student = student or tokenizer_label(tokenizer)
        ids = tokenizer_probe_ids(tokenizer)
        expected = student_token_texts(tokenizer, set(ids) | {0})
        payload = probe_payload(ids)
        chunks = payload["input_ids"]
        answers: Dict[str, Any] = {}

        def validate(url, answer):
            answers[url] = parse_probe(answer, chunks)

        try:
            self.client.broadcast("POST", "/generate", payload, validate=validate, timeout=self.request_timeout)
        except SGLangBadRequest as exc:
            servers = ", ".join(f"{u} ({_server_tokenizer(self.client, u)})" for u in self.client.urls)
            raise TokenizerMismatch(
                f"the teacher server rejected {len(ids)} token ids of the student's tokenizer ({student}) "
                f"probing whether it shares that tokenizer (teacher server(s) {servers}): {exc}. A teacher "
                "that does not accept the student's ids cannot score the student's tokens: serve a teacher "
                "with the student's tokenizer") from None
        verdict, problems, unverified = {}, [], []
        for url in self.client.urls:
            try:
                bad = compare_probe(answers[url], expected)
            except SGLangError as exc:
                raise SGLangError(f"teacher server {url} ({_server_tokenizer(self.client, url)}): {exc}") from None
            if bad is None:
                verdict[url] = "unverified"
                unverified.append(url)
            elif bad:
                verdict[url] = "mismatch"
                shown = "; ".join(f"id {tok}: student {' or '.join(repr(w) for w in want) or '<no such id>'}, "
                                  f"teacher {text!r}" for tok, want, text in sorted(bad)[:examples])
                problems.append(f"{url} ({_server_tokenizer(self.client, url)}): {len(bad)} of "
                                f"{len(set(ids))} probed ids decode differently, e.g. {shown}")
            else:
                verdict[url] = "ok"
        if problems:
            raise TokenizerMismatch(
                f"the teacher does not share the student's tokenizer: student tokenizer {student}; teacher "
                f"server(s) " + " | ".join(problems) + ". The teacher's log-probs of the student's token ids "
                "would be log-probs of other strings: serve a teacher whose tokenizer is the student's "
                "(same vocabulary and ids)")
        if unverified and not _UNVERIFIED_WARNED["warned"]:
            _UNVERIFIED_WARNED["warned"] = True
            names = ", ".join(f"{u} ({_server_tokenizer(self.client, u)})" for u in unverified)
            warnings.warn(f"could not verify that the teacher server(s) {names} share the student's tokenizer "
                          f"({student}): they returned no token texts (return_text_in_logprobs unsupported, "
                          "e.g. an older SGLang). Make sure the teacher uses the student's tokenizer; "
                          "shown once", stacklevel=2)
        return verdict

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
