"""The platform layer: distributed start-up, Megatron's parallel state, seeding, and the CPU shims.

This is the only module of scope_megatron that knows whether CUDA is present. Everything else asks
it for the device (`device()`) and the parallel layout (`layout()`).

Typical start of a training process (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):

    platform.init_distributed()            # NCCL + cuda:LOCAL_RANK on GPU, gloo on CPU
    if not platform.cuda_available():
        platform.apply_cpu_shims()         # first: before megatron.core is imported
    platform.initialize_parallel(tp=2, pp=1)
    platform.seed_everything(1234)
    ...
    platform.destroy()

On a machine without CUDA, megatron-core still makes a few CUDA-only calls (device arguments,
RNG states, synchronizations, tensors created on "cuda", type names). `apply_cpu_shims` replaces
exactly those, each by a small named function documented in `SHIMS` with the megatron-core call
sites it serves; `shims_applied()` reports what was installed and which call sites used it. On a
GPU machine nothing is patched (`apply_cpu_shims` refuses to run there). docs/megatron-platform.md
describes each shim and the versions it was checked against.
"""
from __future__ import annotations

import ast
import contextlib
import datetime
import importlib
import importlib.abc
import importlib.util
import os
import random
import re
import sys
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# --------------------------------------------------------------------------------------------
# Device and distributed start-up
# --------------------------------------------------------------------------------------------

_STATE = {"owns_process_group": False, "layout": None}


def cuda_available() -> bool:
    """Whether this process runs on a GPU (CUDA present and at least one device visible)."""
    return torch.cuda.is_available()


def local_rank() -> int:
    """This process's rank on its node: torchrun's LOCAL_RANK (0 when not launched by torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """The device this process computes on: cuda:LOCAL_RANK on a GPU machine, else cpu."""
    return torch.device("cuda", local_rank()) if cuda_available() else torch.device("cpu")


def init_distributed(backend: Optional[str] = None,
                     timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> None:
    """Joins the default process group from torchrun's environment.

    backend: None picks "nccl" on a GPU machine and "gloo" otherwise. On a GPU machine the CUDA
    device is set to LOCAL_RANK first. Without WORLD_SIZE in the environment (a plain `python`
    launch) the process forms a group of one. If the default group already exists (created by a
    launcher or a test harness) it is used as it is and `destroy()` leaves it alone.
    timeout: of every collective; a hung peer fails after it instead of blocking forever.
    """
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if cuda_available() else "gloo")
    if backend == "nccl" and not cuda_available():
        raise RuntimeError("init_distributed: backend 'nccl' needs CUDA, which this machine lacks; "
                           "use backend='gloo' (or None to choose automatically)")
    if cuda_available():
        torch.cuda.set_device(local_rank())
    if "WORLD_SIZE" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"init_distributed: WORLD_SIZE is set but {', '.join(missing)} "
                               "is not: launch with torchrun, which sets all of them")
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    _STATE["owns_process_group"] = True


# --------------------------------------------------------------------------------------------
# Megatron's parallel state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelLayout:
    """How the world is split: tp * pp * dp == world_size (tensor, pipeline, data parallel).

    vpp: virtual pipeline stages (model chunks) per pipeline rank, None for one chunk.
    sequence_parallel: Megatron's sequence parallelism within the TP group (GPU only).
    """

    world_size: int
    tp: int
    pp: int
    dp: int
    vpp: Optional[int] = None
    sequence_parallel: bool = False


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"initialize_parallel: {name} must be a positive integer, got {value!r}")


def validate_layout(world_size: int, tp: int, pp: int = 1, *, vpp: Optional[int] = None,
                    sequence_parallel: bool = False) -> ParallelLayout:
    """Checks a layout against a world size without touching any process group; returns it.

    Raises ValueError naming the problem and the fix: TP*PP must divide the world size, virtual
    pipeline stages need PP > 1, sequence parallelism needs TP > 1 and a GPU (TransformerEngine's
    layers: Megatron's local ones refuse it).
    """
    _check_positive("world size", world_size)
    _check_positive("tp (tensor_model_parallel_size)", tp)
    _check_positive("pp (pipeline_model_parallel_size)", pp)
    if world_size % (tp * pp):
        raise ValueError(
            f"initialize_parallel: TP*PP = {tp}*{pp} = {tp * pp} does not divide the world size "
            f"{world_size}; launch a multiple of {tp * pp} processes or choose TP and PP whose "
            f"product divides {world_size}")
    if vpp is not None:
        _check_positive("vpp (virtual_pipeline_model_parallel_size)", vpp)
        if pp == 1:
            raise ValueError("initialize_parallel: virtual pipeline stages (vpp) need pipeline "
                             "parallelism; set pp > 1 or vpp=None")
    if sequence_parallel and tp == 1:
        raise ValueError("initialize_parallel: sequence_parallel splits activations across the TP "
                         "group and needs tp > 1; set sequence_parallel=False or tp > 1")
    if sequence_parallel and not cuda_available():
        raise ValueError("initialize_parallel: sequence_parallel needs TransformerEngine's layers "
                         "(Megatron's local layers refuse it), which need a GPU; set "
                         "sequence_parallel=False on CPU")
    return ParallelLayout(world_size, tp, pp, world_size // (tp * pp), vpp, sequence_parallel)


def initialize_parallel(tp: int = 1, pp: int = 1, *, vpp: Optional[int] = None,
                        sequence_parallel: bool = False,
                        distributed_timeout_minutes: int = 30) -> ParallelLayout:
    """Initializes megatron.core.parallel_state: TP and PP as given, DP = world_size / (TP*PP).

    Needs the default process group (`init_distributed`). Validation happens before any group is
    created (see `validate_layout`). Megatron's rank order is its default "tp-cp-ep-dp-pp": the TP
    group holds consecutive ranks. Returns the layout, also available as `layout()`.
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel: torch.distributed is not initialized; call "
                           "platform.init_distributed() first")
    result = validate_layout(dist.get_world_size(), tp, pp, vpp=vpp, sequence_parallel=sequence_parallel)
    _require_shims("initialize_parallel")
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("initialize_parallel: Megatron's parallel state is already initialized; "
                           "call platform.destroy_parallel() before initializing another layout")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=distributed_timeout_minutes)
    _STATE["layout"] = result
    return result


def layout() -> ParallelLayout:
    """The layout set by `initialize_parallel` (RuntimeError before it)."""
    if _STATE["layout"] is None:
        raise RuntimeError("the parallel layout is not initialized; call "
                           "platform.initialize_parallel(tp, pp) first")
    return _STATE["layout"]


def destroy_parallel() -> None:
    """Tears down Megatron's parallel state (the default process group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    _STATE["layout"] = None


def destroy() -> None:
    """Tears down Megatron's parallel state and the default process group if init_distributed
    created it (a group made by someone else is theirs to destroy)."""
    if _STATE["layout"] is not None:
        destroy_parallel()
    if _STATE["owns_process_group"] and dist.is_initialized():
        dist.destroy_process_group()
        _STATE["owns_process_group"] = False


# --------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------


def _require_shims(caller: str) -> None:
    if not cuda_available() and not _APPLIED:
        raise RuntimeError(f"{caller}: this machine has no CUDA; call platform.apply_cpu_shims() "
                           "first (before megatron's modules are imported or used)")


def seed_everything(seed: int) -> None:
    """Seeds python, numpy, torch (CPU and every CUDA device) and Megatron's RNG tracker.

    Call after `initialize_parallel` (and, on CPU, after `apply_cpu_shims`). Each pipeline stage
    uses seed + 100 * pp_rank (Megatron-LM's rule: otherwise every stage would initialize its
    layers as the first stage does); the ranks of a stage share it, and Megatron's tracker
    (`model_parallel_cuda_manual_seed`) derives the streams that must differ: the tensor-parallel
    stream is that seed + 2718 + tp_rank (dropout inside TP regions, GPU weight initialization),
    the data-parallel one is that seed. On CPU the tracker's streams are CPU generator states (the
    rng shim). Sampling and data order do not draw from these (they use their own generators).
    """
    _require_shims("seed_everything")
    if _STATE["layout"] is None:
        raise RuntimeError("seed_everything: call platform.initialize_parallel() first (Megatron's "
                           "RNG tracker derives per-TP-rank streams from the parallel state)")
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def rng_state() -> dict:
    """Every RNG state of this process: python, numpy, torch CPU, CUDA (GPU only) and Megatron's
    tracker streams. Restore with `set_rng_state` for a bit-identical continuation."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch_cpu": torch.get_rng_state(), "tracker": {k: v.clone() for k, v in tracker.items()}}
    if cuda_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what `rng_state` returned (on the same kind of machine)."""
    from megatron.core import tensor_parallel

    if ("torch_cuda" in state) != cuda_available():
        raise RuntimeError("set_rng_state: the RNG state was saved on a "
                           f"{'GPU' if 'torch_cuda' in state else 'CPU'} machine and cannot "
                           "reproduce the stream here; resume on the same kind of machine")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if cuda_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


# --------------------------------------------------------------------------------------------
# CPU shims
# --------------------------------------------------------------------------------------------
#
# Each shim replaces one kind of CUDA-only call that megatron-core makes unconditionally, in
# the narrowest form megatron allows: an attribute of the megatron module that makes the call
# (its `torch` global, seen through a CPU view, or a function of it), or, where a global torch
# function must change, one that raises on a torch without CUDA anyway (so no caller that
# worked before changes behaviour). Every call through a shim is counted per caller; the tests
# compare those callers with the documented call sites.


@dataclass(frozen=True)
class CallSite:
    """A megatron-core function that makes the CUDA-only call a shim serves.

    where: "module:qualname" of the function ("module:<module>" for module-level code), as the
      shim's hit counter names its caller; needle: source text of the call, which the function
      must contain; versions: megatron-core versions that have it (a packaging specifier, ""
      for every supported version).
    """

    where: str
    needle: str
    versions: str = ""

    def applies(self, version: Version) -> bool:
        return not self.versions or version in SpecifierSet(self.versions)


@dataclass(frozen=True)
class Shim:
    """One named replacement of a CUDA-only call: its call sites and its installer. It is
    installed when one of its call sites exists in this megatron-core version and `condition`
    holds (e.g. triton is missing)."""

    name: str
    summary: str
    call_sites: Tuple[CallSite, ...]
    install: Callable[[], None]
    condition: Callable[[], bool] = lambda: True

    def needed(self, version: Version) -> bool:
        return any(site.applies(version) for site in self.call_sites) and self.condition()


@dataclass
class ShimReport:
    """One installed shim, as `shims_applied()` reports it: its call sites in this megatron-core
    version and the callers ("module:qualname") that went through it so far, with counts."""

    name: str
    summary: str
    call_sites: Tuple[CallSite, ...]
    hits: Counter = field(default_factory=Counter)


_APPLIED: Dict[str, ShimReport] = {}
_NOT_CALLERS = {__name__, "contextlib", "importlib._bootstrap", "importlib._bootstrap_external"}
_COMPREHENSION = re.compile(r"(\.<locals>\.<(listcomp|dictcomp|setcomp)>)+$")


def _record(shim: str) -> None:
    """Counts a call through `shim` under its caller: the first frame outside this module,
    contextlib and the import machinery."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in _NOT_CALLERS:
        frame = frame.f_back
    if frame is not None and shim in _APPLIED:
        qualname = _COMPREHENSION.sub("", frame.f_code.co_qualname)  # as Python >= 3.12 names it
        _APPLIED[shim].hits[f"{frame.f_globals.get('__name__')}:{qualname}"] += 1


def megatron_core_dir() -> Path:
    """The megatron/core directory that `import megatron.core` loads (installed or first on
    PYTHONPATH), found without importing it (megatron-core 0.19 imports triton on import)."""
    spec = importlib.util.find_spec("megatron.core")
    if spec is None:
        raise ImportError("megatron-core is not installed: pip install megatron-core")
    return Path(list(spec.submodule_search_locations)[0])


def megatron_version() -> Version:
    """The version of that megatron-core, read from its package_info.py without importing it."""
    tree = ast.parse((megatron_core_dir() / "package_info.py").read_text())
    parts = {target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for target in node.targets
             if isinstance(target, ast.Name) and target.id in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE")}
    return Version(f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}{parts.get('PRE_RELEASE', '')}")


class _TorchView(types.ModuleType):
    """`torch` as one megatron-core module sees it on a CPU machine: the real torch, except for
    the attributes the shims set on this view (and on its `cuda` view). Installed as that
    module's global `torch`, so nothing outside the module changes."""

    def __init__(self, owner: str):
        super().__init__(f"torch (CPU view for {owner})")
        self.cuda = _CudaView(owner)

    def __getattr__(self, name):
        return getattr(torch, name)


class _CudaView(types.ModuleType):
    """`torch.cuda` as one megatron-core module sees it on a CPU machine (see _TorchView)."""

    def __init__(self, owner: str):
        super().__init__(f"torch.cuda (CPU view for {owner})")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _torch_view(module_name: str) -> _TorchView:
    """The CPU view of torch in a megatron-core module (installed on first use)."""
    module = importlib.import_module(module_name)
    current = getattr(module, "torch", None)
    if isinstance(current, _TorchView):
        return current
    if current is not torch:
        raise RuntimeError(f"CPU shims: {module_name} has no module-level `import torch`; revise "
                           "the shim serving it for this megatron-core version")
    module.torch = _TorchView(module_name)
    return module.torch


def _site_modules(shim: str) -> list:
    """The modules of a shim's call sites in this megatron-core version."""
    version = megatron_version()
    return sorted({site.where.split(":")[0] for site in _SHIM_BY_NAME[shim].call_sites
                   if site.applies(version)})


# ---- triton ---------------------------------------------------------------------------------

_PAGED_STASH_KERNELS = "megatron.core.transformer.moe.ops.paged_stash"


class _MissingTritonKernel:
    """Stands in for a Triton kernel of a GPU-only module: launching it raises."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        raise RuntimeError(f"{self.name} is a Triton kernel (MoE paged stash, GPU only) and this "
                           "machine has no triton; set moe_paged_stash=False")

    __call__ = __getitem__


class _PagedStashKernelsStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a stub for megatron.core.transformer.moe.ops.paged_stash, whose `import triton`
    fails on a torch without triton."""

    def find_spec(self, name, path=None, target=None):
        if name != _PAGED_STASH_KERNELS:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        _record("triton")
        module.GLOBAL_BLOCK_SIZE = None
        module.paged_stash_copy_kernel = _MissingTritonKernel("paged_stash_copy_kernel")
        module.paged_stash_pop_kernel = _MissingTritonKernel("paged_stash_pop_kernel")


def _triton_missing() -> bool:
    return importlib.util.find_spec("triton") is None


def _install_triton() -> None:
    """Registers the stub of the Triton kernels of MoE paged stashing (GPU only): the pipeline
    schedules and GPTModel import them through moe.paged_stash when megatron.core is imported;
    they are launched only with moe_paged_stash=True, where the stub raises."""
    sys.meta_path.insert(0, _PagedStashKernelsStub())


# ---- current_device -------------------------------------------------------------------------


def _cpu_current_device() -> str:
    _record("current_device")
    return "cpu"


def _install_current_device() -> None:
    """torch.cuda.current_device() -> "cpu", process-wide. Megatron passes it as `device=` in more
    than a hundred places across dozens of modules; on a torch without CUDA the original raises."""
    torch.cuda.current_device = _cpu_current_device


# ---- rng ------------------------------------------------------------------------------------


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    _record("rng")
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe=False) -> None:
    _record("rng")
    torch.set_rng_state(new_state)


def _cpu_rng_tracker_class(base):
    """Megatron's RNG tracker over the CPU generator: named streams are CPU generator states and
    `fork` swaps one in and out of the CPU generator, as the CUDA tracker does with the GPU's."""

    class CpuRNGStatesTracker(base):
        def add(self, name, seed):
            _record("rng")
            if seed in self.seeds_:
                raise ValueError(f"RNG tracker: seed {seed} is already used")
            if name in self.states_:
                raise ValueError(f"RNG tracker: stream {name!r} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            _record("rng")
            if name not in self.states_:
                raise KeyError(f"RNG tracker: stream {name!r} was never added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def _install_rng() -> None:
    """In megatron.core.tensor_parallel.random only: the RNG tracker class (whose `add` reads
    torch.cuda.get_rng_state, which raises, and seeds through torch.cuda.manual_seed, a silent
    no-op without CUDA) and the CUDA generator accessors _get_cuda_rng_state /
    _set_cuda_rng_state (activation recomputation) map to the CPU generator. The tracker object
    is recreated from the new class."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker = _cpu_rng_tracker_class(mrandom.CudaRNGStatesTracker)
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mrandom.initialize_rng_tracker(force_reset=True)


# ---- sync -----------------------------------------------------------------------------------


def _cpu_synchronize(device=None) -> None:
    _record("sync")


def _install_sync() -> None:
    """torch.cuda.synchronize -> no-op, in the modules of the call sites only (a CPU op has
    completed when it returns; the original raises without CUDA)."""
    for module in _site_modules("sync"):
        _torch_view(module).cuda.synchronize = _cpu_synchronize


# ---- cuda_literal ---------------------------------------------------------------------------

_CPU_FACTORIES = ("tensor", "zeros", "ones")  # the factories the call sites use


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and value.split(":")[0] == "cuda"


def _cpu_factory(fn):
    """The torch tensor factory `fn` with device="cuda" (or torch.device("cuda")) mapped to the CPU."""

    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            _record("cuda_literal")
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    factory.__doc__ = f"torch.{fn.__name__} with device='cuda' mapped to the CPU (a CPU shim)."
    return factory


def _cpu_tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    _record("cuda_literal")
    return self


def _install_cuda_literal() -> None:
    """Tensors megatron creates on "cuda" are created on the CPU. Factories
    (torch.tensor/zeros/ones(..., device="cuda")): through the CPU view of torch in the
    modules of the call sites only. Tensor.cuda(): process-wide, returning the tensor itself (a
    method cannot be scoped to a module; the original raises without CUDA)."""
    for module in _site_modules("cuda_literal"):
        view = _torch_view(module)
        for name in _CPU_FACTORIES:
            setattr(view, name, _cpu_factory(getattr(torch, name)))
    torch.Tensor.cuda = _cpu_tensor_cuda


# ---- tensor_type ----------------------------------------------------------------------------

_ORIGINAL_TENSOR_TYPE = torch.Tensor.type
_TYPE_NAME_CALLERS: frozenset = frozenset()


def _type_seen_by_megatron_optimizer(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is not None or kwargs:
        return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)
    name = _ORIGINAL_TENSOR_TYPE(self)
    if (sys._getframe(1).f_globals.get("__name__") in _TYPE_NAME_CALLERS
            and name.startswith("torch.") and not self.is_cuda):
        _record("tensor_type")
        return "torch.cuda." + name[len("torch."):]
    return name


def _install_tensor_type() -> None:
    """tensor.type() reports "torch.cuda.FloatTensor" (HalfTensor, BFloat16Tensor) for CPU
    tensors, to callers in the modules of the call sites only: megatron's optimizer dispatches
    on these names (fp32 vs 16-bit parameters) and asserts them. Every other caller gets
    torch's answer (the original does not raise, so it must not change for anyone else)."""
    global _TYPE_NAME_CALLERS
    _TYPE_NAME_CALLERS = frozenset(_site_modules("tensor_type"))
    torch.Tensor.type = _type_seen_by_megatron_optimizer


# ---- streams --------------------------------------------------------------------------------


class _NullStream:
    """A CUDA stream stand-in for the CPU, where every op has completed when it returns: waits,
    records and synchronizations do nothing."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        pass


def _cpu_current_stream(device=None) -> _NullStream:
    _record("streams")
    return _NullStream()


def _install_streams() -> None:
    """torch.cuda.current_stream() -> a no-op stream, in the modules of the call sites only."""
    for module in _site_modules("streams"):
        _torch_view(module).cuda.current_stream = _cpu_current_stream


# ---- the registry ---------------------------------------------------------------------------

_MC = "megatron.core"
_PP = f"{_MC}.pipeline_parallel"
_OPTIM = f"{_MC}.optimizer"
_P2P = f"{_PP}.p2p_communication:P2PCommunicator._communicate"
_CUDA_Q, _CUDA_QQ = "device='cuda'", 'device="cuda"'
_CURRENT_DEVICE = "torch.cuda.current_device()"

SHIMS: Tuple[Shim, ...] = (
    Shim("triton", "stub the GPU-only Triton module megatron.core.transformer.moe.ops.paged_stash", (
        CallSite(f"{_MC}.transformer.moe.paged_stash:<module>",
                 "from megatron.core.transformer.moe.ops.paged_stash import", ">=0.19"),
    ), _install_triton, _triton_missing),
    Shim("current_device", 'torch.cuda.current_device() -> "cpu" (process-wide)', (
        CallSite(f"{_MC}.distributed.param_and_grad_buffer:_ParamAndGradBuffer.__init__", _CURRENT_DEVICE),
        CallSite(f"{_MC}.models.common.embeddings.rotary_pos_embedding:RotaryEmbedding.get_emb",
                 _CURRENT_DEVICE),
        CallSite(f"{_MC}.utils:GlobalMemoryBuffer.get_tensor", _CURRENT_DEVICE),
        CallSite(f"{_MC}.tensor_parallel.data:broadcast_data", _CURRENT_DEVICE),
        CallSite(f"{_P2P}.<locals>.create_tensor_recv_prev", _CURRENT_DEVICE),
        CallSite(f"{_P2P}.<locals>.create_tensor_recv_next", _CURRENT_DEVICE),
        CallSite(f"{_MC}.dist_checkpointing.strategies.state_dict_saver:save_state_dict_async_finalize",
                 _CURRENT_DEVICE),
    ), _install_current_device),
    Shim("rng", "Megatron's CUDA RNG tracker and CUDA generator accessors -> the CPU generator", (
        CallSite(f"{_MC}.tensor_parallel.random:model_parallel_cuda_manual_seed",
                 "_CUDA_RNG_STATE_TRACKER.add("),
        CallSite(f"{_MC}.transformer.dot_product_attention:DotProductAttention.forward",
                 "get_cuda_rng_tracker().fork()"),
        CallSite(f"{_MC}.tensor_parallel.random:_get_all_rng_states", "_get_cuda_rng_state("),
        CallSite(f"{_MC}.tensor_parallel.random:_set_all_rng_states", "_set_cuda_rng_state("),
    ), _install_rng),
    Shim("sync", "torch.cuda.synchronize() -> no-op (module-scoped)", (
        CallSite(_P2P, "torch.cuda.synchronize()"),
        CallSite(f"{_MC}.dist_checkpointing.strategies.filesystem_async:"
                 "FileSystemWriterAsync.preload_tensors", "torch.cuda.synchronize()"),
    ), _install_sync),
    Shim("cuda_literal", 'tensors created with device="cuda" or .cuda() -> CPU (factories module-scoped)', (
        CallSite(f"{_OPTIM}.optimizer:FP32Optimizer.__init__", _CUDA_Q),
        CallSite(f"{_OPTIM}.optimizer:MixedPrecisionOptimizer.__init__", _CUDA_Q),
        CallSite(f"{_OPTIM}.optimizer:MegatronOptimizer.has_grad_norm_group", _CUDA_Q, ">=0.19"),
        CallSite(f"{_OPTIM}.clip_grads:get_grad_norm_fp32", _CUDA_Q),
        CallSite(f"{_OPTIM}.clip_grads:clip_grad_by_total_norm_fp32", _CUDA_Q),
        CallSite(f"{_MC}.utils:local_multi_tensor_l2_norm", _CUDA_QQ),
        CallSite(f"{_PP}.schedules:forward_backward_no_pipelining", _CUDA_QQ),
        CallSite(f"{_PP}.schedules:forward_backward_pipelining_without_interleaving", _CUDA_QQ),
        CallSite(f"{_PP}.schedules:forward_backward_pipelining_with_interleaving", _CUDA_QQ),
        CallSite(f"{_MC}.transformer.utils:get_default_causal_mask", _CUDA_QQ),
        CallSite(f"{_MC}.tensor_parallel.data:_build_key_size_numel_dictionaries", _CUDA_Q),
        CallSite(f"{_MC}.tensor_parallel.data:broadcast_data", ".cuda()"),
        CallSite(f"{_MC}.models.common.language_module.language_module:"
                 "LanguageModule.setup_embeddings_and_output_layer", ".cuda()"),
    ), _install_cuda_literal),
    Shim("tensor_type", "tensor.type() -> \"torch.cuda.*Tensor\" for megatron's optimizer modules only", (
        CallSite(f"{_OPTIM}.distrib_optimizer:DistributedOptimizer.__init__", "param.type() in"),
        CallSite(f"{_OPTIM}.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups",
                 "model_param.type() =="),
        CallSite(f"{_OPTIM}.optimizer:Float16OptimizerWithFloat16Params.__init__", "param.type() in"),
        CallSite(f"{_OPTIM}.clip_grads:clip_grad_by_total_norm_fp32", "param.grad.type() =="),
    ), _install_tensor_type),
    Shim("streams", "torch.cuda.current_stream() -> a no-op stream (module-scoped)", (
        CallSite(f"{_MC}.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.start_grad_sync",
                 "torch.cuda.current_stream()", ">=0.19"),
    ), _install_streams),
)
_SHIM_BY_NAME = {shim.name: shim for shim in SHIMS}


def apply_cpu_shims() -> Dict[str, ShimReport]:
    """Installs the CPU shims this megatron-core version needs; returns `shims_applied()`.

    Only for machines without CUDA: on a GPU the shims would put everything on the CPU, so this
    raises there. Idempotent. Call it first, before importing megatron.core (megatron-core 0.19
    imports triton when megatron.core is imported) and before building models or optimizers.
    """
    if cuda_available():
        raise RuntimeError("apply_cpu_shims: CUDA is available; the CPU shims would move megatron "
                           "onto the CPU. Run without them on a GPU machine")
    # Megatron warns at import that it falls back from TransformerEngine / Apex kernels; on a
    # machine without CUDA those cannot exist, so the warnings say nothing there.
    for message in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    version = megatron_version()
    for shim in SHIMS:
        if shim.name not in _APPLIED and shim.needed(version):
            _APPLIED[shim.name] = ShimReport(shim.name, shim.summary,
                                             tuple(s for s in shim.call_sites if s.applies(version)))
            shim.install()
    return shims_applied()


def shims_applied() -> Dict[str, ShimReport]:
    """The installed shims by name, each with its call sites and the callers seen so far."""
    return dict(_APPLIED)
