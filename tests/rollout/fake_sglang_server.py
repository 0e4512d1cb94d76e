"""A stand-in for an SGLang server: the same HTTP API and JSON shapes (docs/sglang-api.md, checked
against sglang's io_struct.py, http_server.py, sampler.py and the scheduler's logprob processor),
backed by a small Hugging Face causal LM (the toy model exported with export_hf) on the CPU.

What it reproduces of SGLang, because our client depends on it:
- /generate: input_ids (single or batch), sampling_params (dict or list), n (prompt-major
  expansion into a flat list), sampling_seed (a per-request generator: same seed, same tokens),
  temperature (< 1e-6 = greedy), top_p, top_k (-1 = off; 0 is rejected like SGLang's verify),
  stop_token_ids plus the model's EOS (both disabled by ignore_eos), max_new_tokens (0 allowed);
  output_token_logprobs = log softmax(logits / T) of the sampled token before top-k/top-p (T = 1
  when greedy), input_token_logprobs at T = 1 for the tokens from logprob_start_len on (-1: the
  last prompt token only), the first entry [null, token, null]; top_logprobs_num; finish_reason
  {"type": "stop", "matched": id} (the stop token stays in output_ids) or {"type": "length"};
  meta_info.weight_version; return_text_in_logprobs: the text slot of every log-prob triple
  (input/output token and top log-probs) holds the token's text, decoded one id at a time by the
  HF tokenizer the server loaded (--tokenizer-path, default the model path) as sglang 0.5.21's
  tokenizer_manager.detokenize_logprob_tokens does (batch_decode([[id], ...])), else null;
  text_in_logprobs=False stands in for a server that leaves it null.
- weights: /update_weights_from_disk (reloads the model; sets weight_version), /get_weights_by_name
  (param.float().tolist()[:truncate_size]: the first truncate_size ROWS of a matrix, as SGLang's
  Llama does; HTTP 400 {"error": {"message": "Get parameter by name failed"}} for an unknown name,
  and for every name when the model class has no get_weights_by_name: in sglang 0.5.21 Llama has
  one, Qwen2 and Qwen3 do not — `weights_by_name` overrides), /begin_weight_update + /update_weights_from_tensor + /end_weight_update (400 outside
  the begin/end pair, as in 0.5.21), /init_weights_update_group + /update_weights_from_distributed
  (recorded; with backend "fake" the tensors arrive through an in-process channel, standing in
  for the NCCL broadcast), /destroy_weights_update_group, /get_model_info, /model_info,
  /get_weight_version, /server_info, /get_server_info, /flush_cache, /health, /health_generate,
  /abort_request {"abort_all": true} (ends the slow and hanging faults in progress; an aborted
  slow /generate answers finish_reason {"type": "abort"}, as SGLang does) or {"rid": r} (ends
  those of the /generate whose rid, or one of whose batch rids, is r; an unknown rid is ignored,
  as sglang's tokenizer manager does). /generate's rid: a string (a batch: rid_0, rid_1, ...) or
  one per batch item; a rid of a request still running is refused with 400 "Duplicate request
  ID detected"; with n > 1 SGLang gives the samples fresh rids, so the given ones are ignored.
- errors: HTTP 400 {"error": {"message"}} for bad /generate input; {"success": false, "message"}
  with 400 for failed weight operations.

Fault injection (tests): POST /fault {"kind", "count", "path", "status", "delay"} or
`inject_fault(...)`: the next `count` requests to `path` (default /generate):
  status: answer HTTP `status` (500, 429, 400, ...);  hang: answer nothing for `delay` seconds,
  then close;  close: close the connection without an answer;  malformed: 200 with a non-JSON
  body;  short_logprobs: a normal answer missing its last log-prob entry;  slow: answer normally after
  `delay` seconds;  ignore_update (for /update_weights_from_disk): report success and set the
  version without loading the weights;  keep_version: load the weights but keep the old version.

Run it as a process:  python -m tests.rollout.fake_sglang_server --model-path DIR --port N
(other sglang.launch_server flags are accepted and ignored), or in-process:
  with FakeSGLangServer(model_dir) as server: ... server.url ...
"""
from __future__ import annotations

import argparse
import atexit
import base64
import io
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional

import torch

# group_name -> {rank_offset: queue}: each server of a weight-update group with backend "fake"
# reads the tensors a test's fake broadcast puts in its queue (fake_broadcast below)
FAKE_BROADCAST: Dict[str, Dict[int, "queue.Queue"]] = {}


def fake_broadcast(tensor, group_name: str) -> None:
    """Delivers `tensor` to every server of the fake group `group_name` (a stand-in for the NCCL
    broadcast from the trainer's rank 0)."""
    for q in FAKE_BROADCAST.get(group_name, {}).values():
        q.put(tensor.detach().clone())


class PickleSerializer:
    """Test stand-in for sglang's MultiprocessingSerializer (same call shape): torch.save of the
    object, base64 when output_str. Tensors travel by value, not by CUDA IPC handle."""

    @staticmethod
    def serialize(obj, output_str: bool = False):
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        return base64.b64encode(data).decode() if output_str else data

    @staticmethod
    def deserialize(data):
        if isinstance(data, str):
            data = base64.b64decode(data)
        return torch.load(io.BytesIO(data), weights_only=False)


class _BadRequest(Exception):
    pass


def _eos_ids(config) -> set:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


# architectures whose sglang 0.5.21 model class implements get_weights_by_name (models/llama.py and
# its subclasses); the others' /get_weights_by_name answers 400 for every name
_REPORTS_WEIGHTS = ("LlamaForCausalLM", "MistralForCausalLM", "GraniteForCausalLM", "OPTForCausalLM")


class FakeSGLangServer:
    """An SGLang-compatible HTTP server on a background thread. port=0 picks a free port."""

    def __init__(self, model_path, *, host: str = "127.0.0.1", port: int = 0,
                 weight_version: str = "default", tp_size: int = 1, deserializer=PickleSerializer,
                 weights_by_name: Optional[bool] = None, tokenizer_path=None, text_in_logprobs: bool = True):
        self.model_path = str(model_path)
        # like sglang's --tokenizer-path: loaded once, kept across weight updates (loaded lazily:
        # some test models have no tokenizer and never need one)
        self.tokenizer_path = str(tokenizer_path or model_path)
        self.text_in_logprobs = bool(text_in_logprobs)
        self._tokenizer = None
        self.weight_version = weight_version
        self.tp_size = int(tp_size)
        self.deserializer = deserializer
        self.model = self._load(self.model_path)
        if weights_by_name is None:  # as sglang 0.5.21's model classes (only Llama's has the method)
            weights_by_name = any(a in _REPORTS_WEIGHTS for a in (self.model.config.architectures or []))
        self.weights_by_name = bool(weights_by_name)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.calls: List[tuple] = []
        self.groups: Dict[str, dict] = {}
        self._faults: List[dict] = []
        self._lock = threading.RLock()
        self._count_lock = threading.Lock()
        self.active = 0  # requests being handled now, and the most at once (concurrency tests)
        self.max_active = 0
        self._updating = False
        self._stop = threading.Event()
        self._abort_epoch = 0  # POST /abort_request {"abort_all": true} ends the slow / hanging waits begun before it
        self._live_rids: set = set()  # rids of the /generate requests running now
        self._aborted_rids: set = set()  # those of them an /abort_request {"rid"} named
        self._thread: Optional[threading.Thread] = None
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self

    # -- lifecycle ------------------------------------------------------------------------------

    @staticmethod
    def _load(path):
        from transformers import AutoModelForCausalLM

        with _LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        return model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    def _add_texts(self, triples):
        """Fills the text slot of [logprob, id, text] triples (None entries stay None)."""
        live = [t for t in triples if t is not None]
        if live:
            for t, text in zip(live, self.tokenizer.batch_decode([[int(t[1])] for t in live])):
                t[2] = text
        return triples

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeSGLangServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"fake-sglang-{self.url}")
        self._thread.start()
        return self

    def _wait(self, seconds: float, rids=()) -> bool:
        """Sleeps up to `seconds` (a fault's delay); True when an /abort_request ended it early
        (abort_all, or one of the request's `rids`)."""
        epoch, until = self._abort_epoch, time.monotonic() + seconds
        while not self._stop.wait(0.02):
            if self._abort_epoch != epoch or any(r in self._aborted_rids for r in rids):
                return True
            if time.monotonic() >= until:
                return False
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def inject_fault(self, kind: str, count: int = 1, path: str = "/generate", status: int = 500,
                     delay: float = 30.0) -> None:
        if kind not in ("status", "hang", "slow", "close", "malformed", "short_logprobs", "ignore_update",
                        "keep_version"):
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._faults.append(dict(kind=kind, count=int(count), path=path, status=int(status),
                                     delay=float(delay)))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, path: str) -> Optional[dict]:
        with self._lock:
            for f in self._faults:
                if f["path"] == path and f["count"] > 0:
                    f["count"] -= 1
                    return dict(f)
        return None

    @staticmethod
    def request_rids(req) -> List[str]:
        """The rids of a /generate body as SGLang's GenerateReqInput normalizes them ([] without a
        rid, or with n > 1: SGLang then gives every sample a fresh rid)."""
        rid = req.get("rid") if isinstance(req, dict) else None
        if rid is None:
            return []
        sps = req.get("sampling_params") or {}
        if any((sp or {}).get("n", 1) != 1 for sp in (sps if isinstance(sps, list) else [sps])):
            return []
        ids = req.get("input_ids") or []
        if not (len(ids) > 0 and isinstance(ids[0], list)):
            return [str(rid)]
        if isinstance(rid, str):
            return [f"{rid}_{i}" for i in range(len(ids))]
        if not isinstance(rid, list) or len(rid) != len(ids):
            raise _BadRequest("The specified rids length mismatch with the batch_size for batch processing.")
        return [str(r) for r in rid]

    def calls_to(self, path: str) -> list:
        return [payload for p, payload in self.calls if p == path]

    # -- model ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits.float()

    @staticmethod
    def _sample_params(sp: dict) -> dict:
        p = dict(temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, max_new_tokens=128, stop_token_ids=None,
                 ignore_eos=False, n=1, sampling_seed=None)
        unknown = set(sp) - set(p) - {"stop", "skip_special_tokens", "spaces_between_special_tokens",
                                      "no_stop_trim", "min_new_tokens", "frequency_penalty",
                                      "presence_penalty", "repetition_penalty", "stream_interval"}
        if unknown:
            raise _BadRequest(f"unexpected sampling params {sorted(unknown)}")
        p.update(sp)
        # sglang/srt/sampling/sampling_params.py: verify()
        if p["temperature"] < 0:
            raise _BadRequest(f"temperature must be non-negative, got {p['temperature']}.")
        if not 0 < p["top_p"] <= 1:
            raise _BadRequest(f"top_p must be in (0, 1], got {p['top_p']}.")
        if p["top_k"] < 1 and p["top_k"] != -1:
            raise _BadRequest(f"top_k must be -1 (disable), or at least 1, got {p['top_k']}.")
        if p["max_new_tokens"] is None or p["max_new_tokens"] < 0:
            raise _BadRequest(f"max_new_tokens must be at least 0, got {p['max_new_tokens']}.")
        if p["n"] < 1:
            raise _BadRequest(f"n must be at least 1, got {p['n']}.")
        return p

    @staticmethod
    def _triples(values, ids):
        return [[float(v), int(i), None] for v, i in zip(values, ids)]

    def _run_group(self, items: List[dict]) -> None:
        """Decodes items that share one prompt length together (a full forward per step)."""
        width = len(items[0]["input_ids"])
        tokens = torch.tensor([it["input_ids"] for it in items], dtype=torch.int64)
        gens = []
        for it in items:
            seed = it["params"]["sampling_seed"]
            g = torch.Generator().manual_seed(int(seed) if seed is not None else
                                              int.from_bytes(uuid.uuid4().bytes[:6], "little"))
            gens.append(g)
        eos = _eos_ids(self.model.config)
        limits = [min(it["params"]["max_new_tokens"], max(0, self.context_length - width)) for it in items]
        done = [lim == 0 for lim in limits]
        for it in items:
            it.update(output_ids=[], output_lp=[], output_top=[], finish=None)
        step = 0
        with self._lock:
            while True:
                logits = self._logits(tokens)
                if step == 0:
                    self._input_logprobs(items, logits)
                if all(done):
                    break
                next_tok = []
                for r, it in enumerate(items):
                    if done[r]:
                        next_tok.append(0)
                        continue
                    tok = self._sample_one(it, logits[r, -1], gens[r])
                    next_tok.append(tok)
                    stop_ids = set(it["params"]["stop_token_ids"] or ())
                    # the length limit first, as SGLang's Req.check_finished: a stop token that
                    # is the last allowed token is reported as "length"
                    if len(it["output_ids"]) >= limits[r]:
                        it["finish"] = {"type": "length", "length": len(it["output_ids"])}
                        done[r] = True
                    elif not it["params"]["ignore_eos"] and (tok in stop_ids or tok in eos):
                        it["finish"] = {"type": "stop", "matched": tok}
                        done[r] = True
                tokens = torch.cat([tokens, torch.tensor(next_tok).unsqueeze(1)], dim=1)
                step += 1
                if all(done):
                    break
        for r, it in enumerate(items):
            if it["finish"] is None:
                it["finish"] = {"type": "length", "length": len(it["output_ids"])}

    def _sample_one(self, it: dict, logits: torch.Tensor, gen: torch.Generator) -> int:
        p = it["params"]
        greedy = p["temperature"] < 1e-6
        temperature = 1.0 if greedy else float(p["temperature"])
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        if greedy:
            tok = int(torch.argmax(logits))
        else:
            probs = logprobs.exp()
            sorted_p, order = probs.sort(descending=True)
            keep = torch.ones_like(sorted_p, dtype=torch.bool)
            if p["top_k"] != -1:
                keep[p["top_k"]:] = False
            keep &= (sorted_p.cumsum(0) - sorted_p) <= p["top_p"]
            keep[0] = True
            sorted_p = torch.where(keep, sorted_p, torch.zeros(()))
            tok = int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
        it["output_ids"].append(tok)
        it["output_lp"].append(float(logprobs[tok]))
        k = it["top_logprobs_num"]
        if k:
            vals, ids = logprobs.topk(min(k, logprobs.numel()))
            it["output_top"].append(self._triples(vals.tolist(), ids.tolist()))
        return tok

    def _input_logprobs(self, items: List[dict], logits: torch.Tensor) -> None:
        lp = torch.log_softmax(logits, dim=-1)  # prompt log-probs are not temperature-scaled
        for r, it in enumerate(items):
            ids = it["input_ids"]
            start = it["logprob_start_len"]
            start = len(ids) - 1 if start == -1 else start
            entries, tops = [[None, int(ids[start]), None]], [None]
            for t in range(start + 1, len(ids)):
                entries.append([float(lp[r, t - 1, ids[t]]), int(ids[t]), None])
                if it["top_logprobs_num"]:
                    vals, top_ids = lp[r, t - 1].topk(min(it["top_logprobs_num"], lp.shape[-1]))
                    tops.append(self._triples(vals.tolist(), top_ids.tolist()))
            it["input_lp"], it["input_top"] = entries, tops

    def generate(self, req: dict, fault: Optional[dict]):
        if req.get("input_ids") is None:
            raise _BadRequest("the fake SGLang server takes input_ids only (text is not supported)")
        ids = req["input_ids"]
        single = not (len(ids) > 0 and isinstance(ids[0], list))
        inputs = [ids] if single else ids
        sps = req.get("sampling_params") or {}
        sps = sps if isinstance(sps, list) else [sps] * len(inputs)

        def per_item(field, default):
            v = req.get(field, default)
            v = default if v is None else v
            return v if isinstance(v, list) else [v] * len(inputs)

        return_lp = per_item("return_logprob", False)
        starts = per_item("logprob_start_len", -1)
        top_nums = per_item("top_logprobs_num", 0)
        with_text = bool(req.get("return_text_in_logprobs", False)) and self.text_in_logprobs
        if len(sps) != len(inputs):
            raise _BadRequest("sampling_params and input_ids have different batch sizes")
        params = [self._sample_params(sp) for sp in sps]
        n = params[0]["n"]
        if any(p["n"] != n for p in params):
            raise _BadRequest("all requests of a batch must have the same n")
        items = []
        for i, inp in enumerate(inputs):
            if not inp or not all(isinstance(t, int) for t in inp):
                raise _BadRequest(f"input_ids[{i}] must be a non-empty list of token ids")
            if max(inp) >= self.model.config.vocab_size or min(inp) < 0:
                raise _BadRequest(f"input_ids[{i}] holds a token id outside the vocabulary")
            if len(inp) >= self.context_length:
                raise _BadRequest(f"The input ({len(inp)} tokens) is longer than the model's context "
                                  f"length ({self.context_length} tokens).")
            if starts[i] < -1 or starts[i] >= len(inp):
                raise _BadRequest(f"logprob_start_len ({starts[i]}) must be < the input length ({len(inp)})")
            for _ in range(n):
                items.append(dict(input_ids=list(inp), params=params[i], return_logprob=bool(return_lp[i]),
                                  logprob_start_len=int(starts[i]), top_logprobs_num=int(top_nums[i] or 0),
                                  return_text=with_text))
        t0 = time.time()
        by_len: Dict[int, List[dict]] = {}
        for it in items:
            by_len.setdefault(len(it["input_ids"]), []).append(it)
        for group in by_len.values():
            self._run_group(group)
        out = [self._answer(it, time.time() - t0) for it in items]
        if fault is not None and fault["kind"] == "short_logprobs":
            for o in out:
                meta = o["meta_info"]
                key = "output_token_logprobs" if meta.get("output_token_logprobs") else "input_token_logprobs"
                if meta.get(key):
                    meta[key] = meta[key][:-1]
        return out[0] if single and n == 1 else out

    def _answer(self, it: dict, latency: float) -> dict:
        meta = {
            "id": uuid.uuid4().hex,
            "finish_reason": it["finish"],
            "prompt_tokens": len(it["input_ids"]),
            "completion_tokens": len(it["output_ids"]),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": latency,
        }
        if it["return_logprob"]:
            meta["input_token_logprobs"] = it["input_lp"]
            meta["output_token_logprobs"] = self._triples(it["output_lp"], it["output_ids"])
            if it["top_logprobs_num"]:
                meta["input_top_logprobs"] = it["input_top"]
                meta["output_top_logprobs"] = it["output_top"]
            if it["return_text"]:
                self._add_texts(meta["input_token_logprobs"])
                self._add_texts(meta["output_token_logprobs"])
                for key in ("input_top_logprobs", "output_top_logprobs"):
                    for entry in meta.get(key) or ():
                        if entry is not None:
                            self._add_texts(entry)
        return {"text": "", "output_ids": list(it["output_ids"]), "meta_info": meta}

    # -- weights --------------------------------------------------------------------------------

    def _named_params(self) -> dict:
        return dict(self.model.named_parameters())

    def _load_tensors(self, named) -> None:
        params = self._named_params()
        with self._lock, torch.no_grad():
            for name, tensor in named:
                if name not in params:
                    raise _BadRequest(f"unknown parameter {name}")
                if tuple(params[name].shape) != tuple(tensor.shape):
                    raise _BadRequest(f"{name}: shape {tuple(tensor.shape)} != the model's "
                                      f"{tuple(params[name].shape)}")
                params[name].copy_(tensor.to(params[name].dtype))

    def update_weights_from_disk(self, req: dict, fault):
        path = req.get("model_path")
        if not path:
            return 400, {"success": False, "message": "model_path is required", "num_paused_requests": 0}
        if fault is None or fault["kind"] != "ignore_update":
            try:
                model = self._load(path)
            except Exception as exc:  # SGLang answers a failed load with success=false
                return 400, {"success": False, "message": f"Failed to load weights from {path}: {exc}",
                             "num_paused_requests": 0}
            if model.config.vocab_size != self.model.config.vocab_size:
                return 400, {"success": False, "message": "the new model has another architecture",
                             "num_paused_requests": 0}
            with self._lock:
                self.model, self.model_path = model, path
        message = "Succeeded to update model weights."
        if req.get("weight_version") is not None and (fault is None or fault["kind"] != "keep_version"):
            self.weight_version = str(req["weight_version"])
            message += f" Weight version updated to {self.weight_version}."
        return 200, {"success": True, "message": message, "num_paused_requests": 0}

    def get_weights_by_name(self, req: dict):
        name, size = req.get("name"), int(req.get("truncate_size", 100))
        params = self._named_params()
        if name == "lm_head.weight" and getattr(self.model.config, "tie_word_embeddings", False):
            name = "model.embed_tokens.weight"
        if name not in params or not self.weights_by_name:
            return None  # SGLang: the model raised (or has no get_weights_by_name) -> HTTP 400
        with self._lock:
            return params[name].detach().float().tolist()[:size]

    def update_weights_from_tensor(self, req: dict):
        if not self._updating:
            return 400, {"success": False, "message": "update_weights_from_tensor must run between "
                                                      "begin_weight_update() and end_weight_update()"}
        shards = req.get("serialized_named_tensors") or []
        if len(shards) != self.tp_size:
            return 400, {"success": False, "message": f"serialized_named_tensors has {len(shards)} items; "
                                                      f"the server has tp_size {self.tp_size}"}
        try:
            self._load_tensors(self.deserializer.deserialize(shards[0]))
        except _BadRequest as exc:
            return 400, {"success": False, "message": str(exc)}
        if req.get("weight_version") is not None:
            self.weight_version = str(req["weight_version"])
        return 200, {"success": True, "message": "Succeeded to update model weights."}

    def init_weights_update_group(self, req: dict):
        for key in ("master_address", "master_port", "rank_offset", "world_size"):
            if key not in req:
                return 400, {"success": False, "message": f"{key} is required"}
        name = req.get("group_name", "weight_update_group")
        self.groups[name] = dict(req)
        if req.get("backend") == "fake":
            self.groups[name]["queue"] = queue.Queue()
            FAKE_BROADCAST.setdefault(name, {})[int(req["rank_offset"])] = self.groups[name]["queue"]
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def update_weights_from_distributed(self, req: dict):
        name = req.get("group_name", "weight_update_group")
        if name not in self.groups:
            return 400, {"success": False, "message": f"no weights update group {name!r}; "
                                                      "call init_weights_update_group first"}
        names, dtypes, shapes = req.get("names") or [], req.get("dtypes") or [], req.get("shapes") or []
        if not (len(names) == len(dtypes) == len(shapes)):
            return 400, {"success": False, "message": "names, dtypes and shapes differ in length"}
        channel = self.groups[name].get("queue")
        if channel is None:
            return 400, {"success": False, "message": "the fake server receives broadcasts only in "
                                                      "groups with backend 'fake'"}
        received = []
        for n_, dt, shape in zip(names, dtypes, shapes):
            try:
                tensor = channel.get(timeout=20)
            except queue.Empty:
                return 400, {"success": False, "message": f"timed out waiting for the broadcast of {n_}"}
            if str(tensor.dtype).replace("torch.", "") != dt or list(tensor.shape) != list(shape):
                return 400, {"success": False, "message": f"{n_}: received {tensor.dtype} "
                                                          f"{tuple(tensor.shape)}, announced {dt} {shape}"}
            received.append((n_, tensor))
        try:
            self._load_tensors(received)
        except _BadRequest as exc:
            return 400, {"success": False, "message": str(exc)}
        if req.get("weight_version") is not None:
            self.weight_version = str(req["weight_version"])
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    def model_info(self):
        return {"model_path": self.model_path, "tokenizer_path": self.tokenizer_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.weight_version}

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: Optional[dict], fault: Optional[dict]):
        """(status, JSON-able answer or str for a plain-text body)."""
        if path == "/fault" and method == "POST":
            b = dict(body or {})
            self.inject_fault(b.pop("kind"), **b)
            return 200, {"success": True}
        if path == "/abort_request" and method == "POST":  # SGLang: AbortReq(rid="", abort_all=False)
            if (body or {}).get("abort_all"):
                self._abort_epoch += 1
            else:
                rid = (body or {}).get("rid") or ""
                with self._lock:
                    if rid in self._live_rids:  # sglang's tokenizer manager ignores unknown rids
                        self._aborted_rids.add(rid)
            return 200, ""
        if path in ("/health", "/health_generate"):
            return 200, ""
        if path == "/generate" and method in ("POST", "PUT"):
            try:
                return 200, self.generate(body or {}, fault)
            except _BadRequest as exc:
                return 400, {"error": {"message": str(exc)}}
        if path == "/update_weights_from_disk" and method == "POST":
            return self.update_weights_from_disk(body or {}, fault)
        if path == "/get_weights_by_name":
            values = self.get_weights_by_name(body or {})
            if values is None:  # http_server.get_weights_by_name: _create_error_response
                return 400, {"error": {"message": "Get parameter by name failed"}}
            return 200, values
        if path == "/begin_weight_update" and method == "POST":
            self._updating = True
            return 200, {"success": True, "message": "weight update started"}
        if path == "/end_weight_update" and method == "POST":
            self._updating = False
            return 200, {"success": True, "message": "weight update ended"}
        if path == "/update_weights_from_tensor" and method == "POST":
            return self.update_weights_from_tensor(body or {})
        if path == "/init_weights_update_group" and method == "POST":
            return self.init_weights_update_group(body or {})
        if path == "/update_weights_from_distributed" and method == "POST":
            return self.update_weights_from_distributed(body or {})
        if path == "/destroy_weights_update_group" and method == "POST":
            name = (body or {}).get("group_name", "weight_update_group")
            info = self.groups.pop(name, None)
            if info is not None and "queue" in info:
                FAKE_BROADCAST.get(name, {}).pop(int(info["rank_offset"]), None)
            return 200, {"success": True, "message": "Succeeded to destroy custom process group."}
        if path in ("/get_model_info", "/model_info"):
            return 200, self.model_info()
        if path == "/get_weight_version":
            return 200, {"weight_version": self.weight_version}
        if path in ("/server_info", "/get_server_info"):
            return 200, {"model_path": self.model_path, "tp_size": self.tp_size,
                         "weight_version": self.weight_version, "version": "fake",
                         # what a launcher passed in the environment (checked by the launch tests)
                         "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES",
                                                                "SGLANG_RETURN_ORIGINAL_LOGPROB")}}
        if path == "/flush_cache":
            return 200, "Cache flushed.\n"
        if path == "/calls" and method == "GET":
            return 200, [[p, b] for p, b in self.calls]
        return 404, {"detail": "Not Found"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def _dispatch(self, method: str):
        owner: FakeSGLangServer = self.server.owner
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return self._send(400, {"error": {"message": "the body is not JSON"}})
        if path not in ("/fault", "/calls", "/health"):
            owner.calls.append((path, body))
        rids: List[str] = []
        if path == "/generate" and method in ("POST", "PUT"):
            try:
                rids = owner.request_rids(body)
            except _BadRequest as exc:
                return self._send(400, {"error": {"message": str(exc)}})
            with owner._lock:
                taken = [r for r in rids if r in owner._live_rids]
                if taken:
                    return self._send(400, {"error": {"message": f"Duplicate request ID detected: {taken[0]}"}})
                owner._live_rids.update(rids)
        with owner._count_lock:
            owner.active += 1
            owner.max_active = max(owner.max_active, owner.active)
        try:
            return self._serve(owner, method, path, body, rids)
        finally:
            with owner._count_lock:
                owner.active -= 1
            with owner._lock:
                owner._live_rids.difference_update(rids)
                owner._aborted_rids.difference_update(rids)

    def _serve(self, owner, method, path, body, rids=()):
        fault = owner._take_fault(path)
        if fault is not None:
            kind = fault["kind"]
            if kind == "status":
                return self._send(fault["status"], {"error": {"message": f"injected HTTP {fault['status']}"}})
            if kind == "hang":
                owner._wait(fault["delay"], rids)
                self.close_connection = True
                return None
            if kind == "slow" and owner._wait(fault["delay"], rids):
                return self._send(200, {"text": "", "output_ids": [], "meta_info": {
                    "id": "aborted", "finish_reason": {"type": "abort", "message": "Abort in waiting queue"}}})
            if kind == "close":
                self.close_connection = True
                return None
            if kind == "malformed":
                return self._send_raw(200, b'{"text": "", "output_ids": [1, 2', "application/json")
        try:
            status, answer = owner.handle(method, path, body, fault)
        except Exception as exc:  # a bug in the fake server: answer 500, as SGLang would
            status, answer = 500, {"error": {"message": f"{type(exc).__name__}: {exc}"}}
        return self._send(status, answer)

    def _send(self, status: int, answer):
        if isinstance(answer, str):
            return self._send_raw(status, answer.encode(), "text/plain")
        return self._send_raw(status, json.dumps(answer).encode(), "application/json")

    def _send_raw(self, status: int, data: bytes, ctype: str):
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")


# -- the toy model as an HF directory (for tests) ----------------------------------------------

_TOY: Dict[str, Path] = {}
_TOY_LOCK = threading.Lock()
# transformers' from_pretrained swaps process-wide functions in and out while it builds a model
# (weight init skipped, modules on the meta device); two servers loading at once (an update of
# both) interleave that swapping and can leave it in place, so that every later model of the
# process is built wrong. One load at a time.
_LOAD_LOCK = threading.Lock()


def toy_hf_dir() -> Path:
    """The toy student (checkpoints/toy/student) exported as an HF Llama directory: a temporary
    directory made once per process (removed at exit)."""
    with _TOY_LOCK:
        if "student" not in _TOY:
            from scope_megatron.convert.megatron_to_hf import export_hf
            from scope_megatron.convert.template import write_toy_template
            from scope_megatron.training.checkpoint import checkpoint_info

            root = Path(__file__).resolve().parents[2]
            ckpt = root / "checkpoints" / "toy" / "student"
            tmp = Path(tempfile.mkdtemp(prefix="fake-sglang-toy-"))
            atexit.register(shutil.rmtree, tmp, True)
            write_toy_template(checkpoint_info(ckpt)["model_config"], tmp / "template")
            export_hf(ckpt, tmp / "template", tmp / "hf")
            _TOY["student"] = tmp / "hf"
        return _TOY["student"]


_REF: Dict[str, "torch.nn.Module"] = {}


def reference_logprobs(model_dir, prompt, response, temperature: float = 1.0, top_k: int = 0):
    """float64 log softmax(logits / T) of each response token given the prompt and the response
    before it, from the HF model in `model_dir` (and the top_k (values, ids) per position)."""
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _REF:
        with _LOAD_LOCK:
            _REF[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float64).eval()
    tokens = torch.tensor([list(prompt) + list(response)], dtype=torch.int64)
    with torch.no_grad():
        logits = _REF[key](input_ids=tokens, use_cache=False).logits[0].double()
    lp = torch.log_softmax(logits / temperature, dim=-1)
    p = len(prompt)
    rows = lp[p - 1: p - 1 + len(response)]
    picked = rows.gather(-1, torch.tensor(list(response)).unsqueeze(-1)).squeeze(-1)
    if top_k:
        return picked, rows.topk(top_k, dim=-1)
    return picked


def perturbed_copy(src, dst, *, scale: float = 1.5, shift: float = 0.01, dtype=None) -> Path:
    """An HF directory like `src` whose weights are `w * scale + shift` (optionally cast to dtype):
    a stand-in for the student after some training steps."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, dst / f.name)
    for f in src.glob("*.safetensors"):
        tensors = {k: (v * scale + shift) for k, v in load_file(str(f)).items()}
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / f.name), metadata={"format": "pt"})
    return dst


def retokenized_copy(src, dst, symbols) -> Path:
    """An HF directory like `src` (same config and weights) whose tokenizer is a CharTokenizer over
    `symbols` (ids 0-2 the special tokens, then `symbols` in order): e.g. the toy model with its
    symbols in another order stands in for a teacher with another tokenizer."""
    from scope_megatron.convert.template import save_char_tokenizer
    from scope_megatron.data.tokenizer import CharTokenizer

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)
    save_char_tokenizer(CharTokenizer(symbols), dst)
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fake SGLang server (tests)")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--tp-size", "--tp", type=int, default=1)
    ap.add_argument("--weight-version", default="default")
    ap.add_argument("--tokenizer-path", default=None)
    args, _unknown = ap.parse_known_args(argv)  # other sglang flags are accepted and ignored
    torch.set_num_threads(1)
    server = FakeSGLangServer(args.model_path, host=args.host, port=args.port,
                              weight_version=args.weight_version, tp_size=args.tp_size,
                              tokenizer_path=args.tokenizer_path)
    print(f"fake sglang server ready on {server.url}", flush=True)
    try:
        server.httpd.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
