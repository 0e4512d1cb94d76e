"""Weight sync: makes the SGLang servers sample from the trainer's current student.

A strategy object is called by SGLangEngine.update_weights(step) on EVERY trainer rank (the
export or gather it starts may be collective); only rank 0 of `group` talks HTTP, and its outcome
(success or the error) is broadcast to the other ranks, so that all of them raise together
instead of hanging in the next collective. Each update sets the servers' weight_version to
f"step-{step}" and is verified: every server must report that version (meta_info.weight_version
of a 1-token /generate) and, for a sample of parameters, /get_weights_by_name must match the
values sent (within rtol * max|w| + atol: the server may hold bf16 copies of fp32 weights).
Whether a server can report parameters at all is asked once (/get_weights_by_name of
"lm_head.weight", which every sglang model class with the lookup answers): one that cannot
(sglang 0.5.21's Qwen2 / Qwen3 model classes have no get_weights_by_name: HTTP 400 for every
name) is warned about once and from then on verified by weight_version only; on one that can, a
failed lookup of a parameter we sent is an error (its name is not one of the server's).

  DiskWeightSync         export an HF directory (export_fn), POST /update_weights_from_disk.
                         Works for any placement; verified here against the protocol-faithful
                         test server and, where sglang is installed, a real server.
  TensorWeightSync       colocated trainer and server (same GPUs): /begin_weight_update, buckets
                         of serialized tensors (CUDA IPC handles) to /update_weights_from_tensor,
                         /end_weight_update. GPU path: its HTTP protocol is tested with the fake
                         server and an injected serializer; UNTESTED against real SGLang.
  DistributedWeightSync  trainer and servers on different GPUs: /init_weights_update_group, then
                         per bucket /update_weights_from_distributed (names, dtypes, shapes) while
                         rank 0 broadcasts the tensors over the new NCCL group. GPU path: protocol
                         tested with a fake broadcast; UNTESTED against real SGLang.

Parameter names are Hugging Face names (the server loads HF checkpoints): the tensor strategies
take `named_tensors_fn()` yielding (hf_name, tensor) pairs, e.g. from the HF conversion of the
gathered student.
"""
from __future__ import annotations

import abc
import inspect
import json
import random
import shutil
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from scope_megatron.utils.collectives import result_from_source

from .client import SGLangBadRequest, SGLangClient, SGLangError

NamedTensors = Iterable[Tuple[str, torch.Tensor]]


def weight_version(step: int) -> str:
    """The weight_version string of a training step."""
    return f"step-{int(step)}"


# -- rank handling ----------------------------------------------------------------------------


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _on_rank0(fn: Callable[[], Any], is_rank0: bool, group, share: bool,
              other: Optional[Callable[[], None]] = None) -> Any:
    """fn() on rank 0 (other() on the other ranks) and fn's result on every rank of `group`
    (when torch.distributed runs and `share`); an error on rank 0 is raised on every rank (the
    others get an SGLangError quoting it)."""
    if not is_rank0 and other is not None:
        other()
    if not (share and _dist_ready()):
        return fn() if is_rank0 else None
    return result_from_source(fn, is_source=is_rank0, group=group, error_cls=SGLangError, what="weight sync")


# -- verification -----------------------------------------------------------------------------


def compare_weights(values, expected: torch.Tensor, truncate_size: int, *, rtol: float, atol: float
                    ) -> Tuple[bool, float, str]:
    """Whether a /get_weights_by_name answer matches `expected`: (ok, max |diff|, detail).

    SGLang answers `weight.float().tolist()[:truncate_size]` (the first truncate_size ROWS of a
    matrix; under tensor parallelism possibly fewer rows, those of its first shard); a flat list is
    compared with the flattened tensor's first values; rows beyond the whole expected tensor are
    the server's vocabulary padding (real SGLang pads embedding rows to a multiple of 64) and are
    not compared. Tolerance: rtol * max|expected| + atol."""
    exp = expected.detach().to("cpu", torch.float64)
    got = torch.tensor(values, dtype=torch.float64)
    ref = exp[:truncate_size] if exp.dim() > 0 else exp
    if got.shape != ref.shape:
        if got.dim() == 1 and got.numel() <= exp.numel() and exp.dim() > 1:
            ref = exp.flatten()[: got.numel()]
        elif got.dim() == ref.dim() and got.shape[1:] == ref.shape[1:] and 0 < got.shape[0] <= ref.shape[0]:
            ref = ref[: got.shape[0]]
        elif got.dim() == ref.dim() > 1 and got.shape[1:] == ref.shape[1:] and ref.shape[0] == exp.shape[0]:
            got = got[: ref.shape[0]]  # the server pads vocabulary rows (SGLang: to a multiple of 64)
        else:
            return False, float("inf"), f"shape {tuple(got.shape)} != expected {tuple(ref.shape)}"
    if got.numel() == 0:
        return False, float("inf"), "empty answer"
    diff = float((got - ref).abs().max())
    tol = rtol * float(ref.abs().max()) + atol
    return diff <= tol, diff, f"max |diff| {diff:.3g} (tolerance {tol:.3g})"


# a parameter every sglang model class with get_weights_by_name answers for (Llama, Granite,
# Exaone4, OPT: lm_head.weight, or the embedding when it is tied): the probe of whether a server
# can report parameters at all
_PROBE_PARAMETER = "lm_head.weight"


class _Verifier:
    """Checks that every server reports `version` and holds the expected parameter values."""

    def __init__(self, *, num_verify: int, truncate_size: int, rtol: float, atol: float,
                 probe_ids: Sequence[int], timeout: float):
        self.num_verify = int(num_verify)
        self.truncate_size = int(truncate_size)
        self.rtol, self.atol = float(rtol), float(atol)
        self.probe_ids = [int(t) for t in probe_ids]
        self.timeout = float(timeout)
        self._reports: Dict[str, bool] = {}  # url -> whether it can report parameters (asked once)

    def version(self, client: SGLangClient, version: str) -> None:
        payload = {"input_ids": self.probe_ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}

        def check(url, answer):
            meta = answer.get("meta_info") if isinstance(answer, dict) else None
            got = None if meta is None else meta.get("weight_version")
            if got != version:
                raise SGLangError(f"serves weight_version {got!r} after the update; expected {version!r}")

        client.broadcast("POST", "/generate", payload, validate=check, timeout=self.timeout)

    def reporting(self, client: SGLangClient) -> List[str]:
        """The servers whose parameters can be compared: those that answer /get_weights_by_name
        (asked once per server; none with num_verify=0). The first time some cannot, a warning
        names them: their updates are verified by weight_version only."""
        if self.num_verify <= 0:
            return []
        unknown = [u for u in client.urls if u not in self._reports]
        if unknown:
            why: Dict[str, str] = {}
            for url in unknown:
                try:
                    answer = client.request("POST", "/get_weights_by_name",
                                            {"name": _PROBE_PARAMETER, "truncate_size": 1}, url=url,
                                            timeout=self.timeout)
                    self._reports[url] = answer is not None
                    if answer is None:
                        why[url] = "answered null"
                except SGLangBadRequest as exc:  # the model class has no lookup: 400 for every name
                    self._reports[url] = False
                    why[url] = str(exc)
            if why:
                url, reason = next(iter(why.items()))
                warnings.warn(f"SGLang server(s) {', '.join(why)} cannot report parameter values ({url}: {reason}); "
                              "sglang's model classes other than Llama's have no get_weights_by_name, so weight "
                              "updates to them are verified by weight_version only (num_verify=0 skips the value "
                              "checks); shown once", RuntimeWarning, stacklevel=3)
        return [u for u in client.urls if self._reports[u]]

    def sample_size(self, client: SGLangClient) -> int:
        """How many parameters to sample for weights(): num_verify, or 0 when no server can
        report them (then nothing is exported for the check or asked)."""
        return self.num_verify if self.reporting(client) else 0

    def weights(self, client: SGLangClient, expected: Dict[str, torch.Tensor]) -> None:
        """Compares each expected parameter with the /get_weights_by_name answer of every server
        that can report parameters (see reporting()); raises SGLangError for a value that
        differs, and for a lookup that fails on such a server (the name is not the server's)."""
        urls = self.reporting(client) if expected else []
        if not urls:
            return
        for name, tensor in expected.items():
            def check(url, answer, name=name, tensor=tensor):
                if answer is None:
                    raise SGLangError(f"cannot look up parameter {name} (answered null)")
                ok, diff, detail = compare_weights(answer, tensor, self.truncate_size, rtol=self.rtol, atol=self.atol)
                if not ok:
                    raise SGLangError(f"parameter {name} differs from the trainer's after the weight update: "
                                      f"{detail}")

            try:
                client.broadcast("POST", "/get_weights_by_name", {"name": name, "truncate_size": self.truncate_size},
                                 urls=urls, validate=check, timeout=self.timeout)
            except SGLangBadRequest as exc:
                # the server answered the probe parameter, so it has the lookup: the name is wrong
                raise SGLangError(f"{exc}; this server reports parameters ({_PROBE_PARAMETER} answered), so "
                                  f"{name} is not one of its parameter names: the exported names do not match "
                                  "the served model's") from None


def _check_success(url, answer) -> None:
    if not (isinstance(answer, dict) and answer.get("success", False)):
        message = answer.get("message") if isinstance(answer, dict) else answer
        raise SGLangError(f"weight update failed: {message}")


# -- strategies -------------------------------------------------------------------------------


class WeightSync(abc.ABC):
    """A way of pushing the student's weights to the servers. update() is collective: call it
    on every rank of `group` (default: the world); rank 0 of the group does the HTTP.

    is_rank0: overrides whether this process talks HTTP (default: rank 0 of `group`, or True
      without torch.distributed); it must be True exactly on rank 0 of `group` when
      share_outcome broadcasts the result.
    num_verify: parameters compared with /get_weights_by_name after each update (0: none);
      truncate_size: rows (or values) compared per parameter; rtol, atol: tolerance.
    probe_ids: the prompt of the 1-token /generate that reads each server's weight_version.
    """

    def __init__(self, *, is_rank0: Optional[bool] = None, group=None, share_outcome: bool = True,
                 num_verify: int = 3, truncate_size: int = 100, rtol: float = 1e-2, atol: float = 1e-6,
                 probe_ids: Sequence[int] = (0,), update_timeout: float = 1800.0,
                 verify_timeout: float = 120.0):
        if is_rank0 is None:
            is_rank0 = (not _dist_ready()) or torch.distributed.get_rank(group) == 0
        self.is_rank0 = bool(is_rank0)
        self.group = group
        self.share_outcome = share_outcome
        self.update_timeout = float(update_timeout)
        self.verifier = _Verifier(num_verify=num_verify, truncate_size=truncate_size, rtol=rtol, atol=atol,
                                  probe_ids=probe_ids, timeout=verify_timeout)
        self.version: Optional[str] = None

    @abc.abstractmethod
    def update(self, client: SGLangClient, step: int) -> str:
        """Pushes the current weights as version f"step-{step}"; returns the version (every
        rank). Raises SGLangError on every rank if any server failed or disagrees."""

    def _run(self, fn: Callable[[], str], other: Optional[Callable[[], None]] = None) -> str:
        version = _on_rank0(fn, self.is_rank0, self.group, self.share_outcome, other)
        self.version = version
        return version

    def close(self, client: SGLangClient) -> None:
        """Releases server-side resources (e.g. a process group). Default: nothing."""


def _hf_weight_names(path: Path) -> Dict[str, Path]:
    """{tensor name: safetensors file} of an HF directory."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        mapping = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in mapping.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise SGLangError(f"{path} holds no safetensors weights (model.safetensors or its index)")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def _read_rows(files: Dict[str, Path], names: Sequence[str], truncate_size: int) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for name in names:
        with safe_open(str(files[name]), "pt") as f:
            sl = f.get_slice(name)
            shape = sl.get_shape()
            out[name] = sl[: min(truncate_size, shape[0])] if len(shape) > 0 else f.get_tensor(name)
    return out


class DiskWeightSync(WeightSync):
    """Weights through the file system: export_fn(path) writes an HF directory of the current
    student at `directory/step-<step>` (every rank calls it: the trainer passes a closure around
    export_hf, which is collective and writes on rank 0; it must replace an existing directory,
    e.g. export_hf(..., overwrite=True)). Then rank 0 POSTs /update_weights_from_disk
    {model_path, weight_version, flush_cache: true} to every server and verifies.

    directory: on a file system the servers can read (same path on their hosts).
    keep: exported directories kept (the newest; older ones made by this object are removed after
      a successful update).
    load_format: passed to SGLang (None: its default, "auto").
    """

    def __init__(self, export_fn: Callable[[Path], Any], directory: Union[str, Path], *, keep: int = 1,
                 load_format: Optional[str] = None, **kw):
        super().__init__(**kw)
        if keep < 1:
            raise ValueError("DiskWeightSync: keep must be >= 1")
        self.export_fn = export_fn
        self.directory = Path(directory).absolute()
        self.keep = int(keep)
        self.load_format = load_format
        self._made: List[Path] = []

    def update(self, client: SGLangClient, step: int) -> str:
        version = weight_version(step)
        path = self.directory / version
        if self.is_rank0:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.export_fn(path)  # collective on every rank

        def push() -> str:
            files = _hf_weight_names(path)
            payload = {"model_path": str(path), "weight_version": version, "flush_cache": True,
                       "abort_all_requests": False}
            if self.load_format is not None:
                payload["load_format"] = self.load_format
            client.broadcast("POST", "/update_weights_from_disk", payload, validate=_check_success,
                             timeout=self.update_timeout)
            self.verifier.version(client, version)
            names = sorted(files)
            picked = random.Random(int(step)).sample(names, min(self.verifier.sample_size(client), len(names)))
            self.verifier.weights(client, _read_rows(files, picked, self.verifier.truncate_size))
            if path not in self._made:
                self._made.append(path)
            while len(self._made) > self.keep:
                shutil.rmtree(self._made.pop(0), ignore_errors=True)
            return version

        return self._run(push)


def _drain(it: Iterator) -> None:
    """Consumes the rest of a tensor stream (its collectives run on every rank), discarding it."""
    for _ in it:
        pass


def _buckets(named: NamedTensors, bucket_bytes: int) -> Iterator[Tuple[List[Tuple[str, torch.Tensor]], bool]]:
    """(bucket, is_last) with each bucket's bytes <= bucket_bytes (a larger tensor alone)."""
    pending: List[Tuple[str, torch.Tensor]] = []
    size = 0
    held = None
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > bucket_bytes:
            if held is not None:
                yield held, False
            held, pending, size = pending, [], 0
        pending.append((name, tensor))
        size += nbytes
    if held is not None:
        yield held, not pending
    if pending:
        yield pending, True


class _Reservoir:
    """The first rows of k tensors picked uniformly from a stream (seeded): the verification
    sample of the tensor strategies, taken without holding whole tensors."""

    def __init__(self, k: int, seed: int, rows: int):
        self.k, self.rows, self.rng = int(k), int(rows), random.Random(seed)
        self.seen = 0
        self.items: List[Tuple[str, torch.Tensor]] = []

    def offer(self, name: str, tensor: torch.Tensor) -> None:
        self.seen += 1
        if self.k <= 0:
            return
        head = tensor.detach()[: self.rows] if tensor.dim() > 0 else tensor.detach()
        if len(self.items) < self.k:
            self.items.append((name, head.to("cpu", copy=True)))
        else:
            j = self.rng.randrange(self.seen)
            if j < self.k:
                self.items[j] = (name, head.to("cpu", copy=True))

    def result(self) -> Dict[str, torch.Tensor]:
        return dict(self.items)


def sglang_serializer():
    """sglang's MultiprocessingSerializer (imported lazily: sglang is optional)."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError:
        try:
            from sglang.srt.utils.common import MultiprocessingSerializer
        except ImportError as exc:
            raise SGLangError("TensorWeightSync needs sglang installed in the trainer's environment "
                              "(sglang.srt.utils.MultiprocessingSerializer), or pass serializer=") from exc
    return MultiprocessingSerializer


class TensorWeightSync(WeightSync):
    """Colocated weight update (trainer and server share GPUs): tensors travel as CUDA IPC
    handles through sglang's MultiprocessingSerializer.

    named_tensors_fn(): yields (hf_name, tensor) of the full (unsharded) HF weights; called on
      every rank (it may gather); only rank 0's tensors are sent.
    bucket_bytes: at most this many bytes per /update_weights_from_tensor request (one larger
      tensor goes alone). Small buckets are slow; each bucket's tensors are kept alive until the
      servers answered (no buffer reuse before the load finished).
    tp_size: each server's tensor-parallel size: serialized_named_tensors carries one copy per
      TP rank (each rank opens the handle and keeps its shard).
    serializer: an object with serialize(obj, output_str=True) (default: sglang's; tests inject
      one). With CPU tensors and sglang's serializer the sharing strategy is switched to
      "file_system" (the fd strategy crashes the server, docs/sglang-api.md).

    GPU path: the HTTP protocol is tested with the fake server; UNTESTED against real SGLang.
    """

    def __init__(self, named_tensors_fn: Callable[[], NamedTensors], *, bucket_bytes: int = 512 << 20,
                 tp_size: int = 1, serializer=None, load_format: Optional[str] = None, **kw):
        super().__init__(**kw)
        if bucket_bytes < 1 or tp_size < 1:
            raise ValueError("TensorWeightSync: bucket_bytes and tp_size must be >= 1")
        self.named_tensors_fn = named_tensors_fn
        self.bucket_bytes = int(bucket_bytes)
        self.tp_size = int(tp_size)
        self.serializer = serializer
        self.load_format = load_format

    def update(self, client: SGLangClient, step: int) -> str:
        version = weight_version(step)
        named = iter(self.named_tensors_fn())

        def push() -> str:
            try:
                serializer = self.serializer or sglang_serializer()
                # asked before the update session opens: inside it sglang holds the weights for loading
                sample = _Reservoir(self.verifier.sample_size(client), int(step), self.verifier.truncate_size)
                client.broadcast("POST", "/begin_weight_update", {}, timeout=self.update_timeout)
            except BaseException:
                _drain(named)  # the other ranks' share of the stream runs its collectives
                raise
            try:
                for bucket, last in _buckets(named, self.bucket_bytes):
                    if self.serializer is None and any(not t.is_cuda for _, t in bucket):
                        torch.multiprocessing.set_sharing_strategy("file_system")
                    for name, tensor in bucket:
                        sample.offer(name, tensor)
                    data = serializer.serialize(bucket, output_str=True)
                    payload = {"serialized_named_tensors": [data] * self.tp_size, "flush_cache": last,
                               "abort_all_requests": False}
                    if last:
                        payload["weight_version"] = version
                    if self.load_format is not None:
                        payload["load_format"] = self.load_format
                    client.broadcast("POST", "/update_weights_from_tensor", payload, validate=_check_success,
                                     timeout=self.update_timeout)
                    del data, bucket  # the servers hold their copies now
            except BaseException:
                _drain(named)
                raise
            finally:
                client.broadcast("POST", "/end_weight_update", {}, timeout=self.update_timeout)
            if sample.seen == 0:
                raise SGLangError("TensorWeightSync: named_tensors_fn() yielded no tensors")
            self.verifier.version(client, version)
            self.verifier.weights(client, sample.result())
            return version

        return self._run(push, lambda: _drain(named))


def init_weight_update_group(master_address: str, master_port: int, world_size: int, rank: int,
                             group_name: str, backend: str = "nccl", timeout: Optional[timedelta] = None):
    """A process group of the trainer's rank 0 (rank 0) and the servers' workers (ranks
    rank_offset..), made the way SGLang's init_custom_process_group makes its side (rendezvous on
    tcp://address:port, a PrefixStore named group_name, torch's _new_process_group_helper), so
    that the two sides meet. Uses private torch.distributed API, as SGLang does."""
    from torch.distributed import distributed_c10d as c10d

    timeout = timeout or timedelta(minutes=10)
    store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                   timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    params = inspect.signature(c10d._new_process_group_helper).parameters
    options = {"backend_options" if "backend_options" in params else "pg_options": None}
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name,
                                           timeout=timeout, **options)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _broadcast(tensor: torch.Tensor, group) -> None:
    torch.distributed.broadcast(tensor, src=0, group=group)


class DistributedWeightSync(WeightSync):
    """Weight update over a process group between the trainer's rank 0 and the servers (different
    GPUs). On first use rank 0 POSTs /init_weights_update_group to every server (server i's
    workers get ranks 1 + sum of the earlier servers' tp sizes ..) while it joins the group itself
    (the rendezvous needs both sides at once); then per bucket it POSTs
    /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache (last),
    weight_version (last)} to every server WITHOUT waiting, broadcasts the bucket's tensors
    (src 0) in the announced order, then waits for the answers. Those requests are never retried
    (a repeat would wait for a second broadcast).

    named_tensors_fn: as for TensorWeightSync (tensors on rank 0's GPU).
    master_address, master_port: where rank 0 hosts the rendezvous (reachable by the servers).
    server_tp_sizes: tensor-parallel size of each server (an int: the same for all).
    group_factory(master_address, master_port, world_size, rank, group_name, backend) -> group,
      broadcast(tensor, group): injectable for tests (default: init_weight_update_group and
      torch.distributed.broadcast).

    GPU path: the protocol is tested with a fake broadcast; UNTESTED against real SGLang.
    """

    def __init__(self, named_tensors_fn: Callable[[], NamedTensors], *, master_address: str, master_port: int,
                 server_tp_sizes: Union[int, Sequence[int]] = 1, group_name: str = "weight_update_group",
                 backend: str = "nccl", bucket_bytes: int = 512 << 20, group_factory: Optional[Callable] = None,
                 broadcast: Optional[Callable[[torch.Tensor, Any], None]] = None, **kw):
        super().__init__(**kw)
        self.named_tensors_fn = named_tensors_fn
        self.master_address, self.master_port = master_address, int(master_port)
        self.server_tp_sizes = server_tp_sizes
        self.group_name, self.backend = group_name, backend
        self.bucket_bytes = int(bucket_bytes)
        self.group_factory = group_factory or init_weight_update_group
        self.broadcast = broadcast or _broadcast
        self._group = None

    def _tp_sizes(self, client: SGLangClient) -> List[int]:
        sizes = self.server_tp_sizes
        sizes = [int(sizes)] * len(client.urls) if isinstance(sizes, int) else [int(s) for s in sizes]
        if len(sizes) != len(client.urls):
            raise ValueError(f"DistributedWeightSync: {len(sizes)} server_tp_sizes for {len(client.urls)} servers")
        return sizes

    def connect(self, client: SGLangClient) -> None:
        """Forms the weight-update group (rank 0 only; done by the first update)."""
        sizes = self._tp_sizes(client)
        world = 1 + sum(sizes)
        futures, offset = [], 1
        for url, tp in zip(client.urls, sizes):
            payload = {"master_address": self.master_address, "master_port": self.master_port,
                       "rank_offset": offset, "world_size": world, "group_name": self.group_name,
                       "backend": self.backend}
            futures.append(client.submit(lambda u=url, p=payload: client.request(
                "POST", "/init_weights_update_group", p, url=u, validate=lambda a, u=u: _check_success(u, a),
                retries=0, timeout=self.update_timeout)))
            offset += tp
        try:
            self._group = self.group_factory(self.master_address, self.master_port, world, 0, self.group_name,
                                             self.backend)
        finally:
            for f in futures:
                f.result()

    def update(self, client: SGLangClient, step: int) -> str:
        version = weight_version(step)
        named = iter(self.named_tensors_fn())

        def push() -> str:
            try:
                if self._group is None:
                    self.connect(client)
                sample = _Reservoir(self.verifier.sample_size(client), int(step), self.verifier.truncate_size)
            except BaseException:
                _drain(named)  # the other ranks' share of the stream runs its collectives
                raise
            seen = 0
            for bucket, last in _buckets(named, self.bucket_bytes):
                payload = {"names": [n for n, _ in bucket],
                           "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
                           "shapes": [list(t.shape) for _, t in bucket],
                           "group_name": self.group_name, "flush_cache": last, "abort_all_requests": False}
                if last:
                    payload["weight_version"] = version
                futures = [client.submit(lambda u=u: client.request(
                    "POST", "/update_weights_from_distributed", payload, url=u,
                    validate=lambda a, u=u: _check_success(u, a), retries=0, timeout=self.update_timeout))
                    for u in client.urls]
                try:
                    for name, tensor in bucket:
                        sample.offer(name, tensor)
                        self.broadcast(tensor.contiguous(), self._group)
                        seen += 1
                except BaseException:
                    _drain(named)
                    raise
                finally:
                    for f in futures:
                        f.result()
            if seen == 0:
                raise SGLangError("DistributedWeightSync: named_tensors_fn() yielded no tensors")
            self.verifier.version(client, version)
            self.verifier.weights(client, sample.result())
            return version

        return self._run(push, lambda: _drain(named))

    def close(self, client: SGLangClient) -> None:
        if self.is_rank0 and self._group is not None:
            try:
                client.broadcast("POST", "/destroy_weights_update_group", {"group_name": self.group_name},
                                 retries=0)
            except (SGLangError, SGLangBadRequest):
                pass
            self._group = None
