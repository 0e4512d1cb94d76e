"""The platform layer: start-up and layout validation, and the CPU shims checked against
megatron-core in both directions:
- a call site a shim documents has left megatron's source (static, per call site), or none of
  the features used it (the launches): the shim or its documentation is stale -> fail;
- a caller the documentation does not name went through a shim, or a feature fails with every
  shim applied (test_models.py, test_checkpoint.py): the shims are insufficient -> fail.
A call through a shim is a call that fails without it on a torch without CUDA (each replaced
function raises there, or, for tensor_type, megatron's optimizer raises on the CPU type name).
Set SCOPE_TEST_MEGATRON_SRC to run all of this against another megatron-core source tree."""
import ast
import datetime

import pytest
import torch
import torch.distributed as dist

import tests.training.mc_megatron_src  # noqa: F401  (first: may redirect `import megatron`)
from scope_megatron.training import platform
from tests.training import mc_launches

VERSION = platform.megatron_version()
CALL_SITES = [(shim.name, site) for shim in platform.SHIMS for site in shim.call_sites]


def _site_id(item):
    shim, site = item
    return f"{shim}:{site.where.split('megatron.core.')[-1]}"


# ---- layout validation and start-up -----------------------------------------------------------


def test_validate_layout_derives_dp():
    assert platform.validate_layout(8, 2, 2) == platform.ParallelLayout(8, 2, 2, 2)
    assert platform.validate_layout(2, 1, 2, vpp=2).vpp == 2


@pytest.mark.parametrize("args,kwargs,message", [
    ((2, 3, 1), {}, "TP*PP = 3*1 = 3 does not divide the world size 2"),
    ((8, 2, 3), {}, "does not divide the world size 8"),
    ((4, 0, 1), {}, "tp (tensor_model_parallel_size) must be a positive integer"),
    ((4, 2, 1), {"vpp": 2}, "virtual pipeline stages (vpp) need pipeline parallelism"),
    ((4, 1, 1), {"sequence_parallel": True}, "needs tp > 1"),
    ((4, 2, 1), {"sequence_parallel": True}, "needs TransformerEngine's layers"),
])
def test_validate_layout_errors(args, kwargs, message):
    with pytest.raises(ValueError) as info:
        platform.validate_layout(*args, **kwargs)
    assert message in str(info.value)


def test_init_distributed_without_torchrun_forms_a_group_of_one(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    platform.init_distributed(timeout=datetime.timedelta(seconds=30))
    try:
        assert dist.get_world_size() == 1
        assert dist.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    finally:
        platform.destroy()
    assert not dist.is_initialized()


def test_init_distributed_names_missing_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        platform.init_distributed()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_megatron_needs_shims_first_on_cpu(monkeypatch):
    monkeypatch.setattr(platform, "_APPLIED", {})
    with pytest.raises(RuntimeError, match="apply_cpu_shims"):
        platform.seed_everything(1)


def test_shims_refuse_to_run_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(platform, "_APPLIED", {})
    with pytest.raises(RuntimeError, match="CUDA is available"):
        platform.apply_cpu_shims()
    assert platform.shims_applied() == {}


# ---- the shims: static ------------------------------------------------------------------------


def _function_source(where: str) -> str:
    """Source of "module:qualname" in the megatron-core that `import megatron.core` loads, read
    without importing it; the innermost named function (nested <locals> included)."""
    module, qualname = where.split(":")
    path = platform.megatron_core_dir().joinpath(*module.split(".")[2:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    assert path.exists(), f"{module} no longer exists in megatron-core {VERSION}"
    text = path.read_text()
    node = ast.parse(text)
    if qualname == "<module>":
        return text
    for name in qualname.split("."):
        if name == "<locals>":
            continue
        matches = [child for child in ast.walk(node) if getattr(child, "name", None) == name
                   and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert matches, f"{where}: {name} no longer exists in megatron-core {VERSION}"
        node = matches[0]
    return ast.get_source_segment(text, node)


@pytest.mark.parametrize("item", CALL_SITES, ids=map(_site_id, CALL_SITES))
def test_call_site_still_in_megatron_source(item):
    shim, site = item
    if not site.applies(VERSION):
        pytest.skip(f"not in megatron-core {VERSION} ({site.versions})")
    source = _function_source(site.where)
    assert site.needle in source, (
        f"shim {shim}: {site.where} no longer contains {site.needle!r} in megatron-core {VERSION}; "
        "if megatron stopped making this CUDA call, remove the call site (and the shim when none is left)")


def test_every_view_module_imports_torch_at_module_level():
    """The module-scoped shims replace the `torch` global of their call sites' modules."""
    for shim in ("sync", "cuda_literal", "streams"):
        for site in _shim(shim).call_sites:
            if site.applies(VERSION):
                tree = ast.parse(_function_source(site.where.split(":")[0] + ":<module>"))
                imports = [a for n in tree.body if isinstance(n, ast.Import) for a in n.names]
                assert any(a.name == "torch" and a.asname is None for a in imports), \
                    f"{site.where}: no module-level `import torch`"


# ---- the shims: dynamic (what the launches went through) --------------------------------------


def _shim(name: str) -> platform.Shim:
    return next(shim for shim in platform.SHIMS if shim.name == name)


def _installed_here():
    return {shim.name for shim in platform.SHIMS if shim.needed(VERSION)}


@pytest.mark.parametrize("item", CALL_SITES, ids=map(_site_id, CALL_SITES))
def test_call_site_used_by_the_features(item):
    shim, site = item
    if not site.applies(VERSION):
        pytest.skip(f"not in megatron-core {VERSION} ({site.versions})")
    if shim not in _installed_here():
        pytest.skip(f"shim {shim} is not needed here (triton is installed)")
    hits = mc_launches.shim_hits().get(shim, {})
    assert hits.get(site.where), (
        f"shim {shim}: the training features never went through {site.where} with megatron-core "
        f"{VERSION} (callers seen: {sorted(hits)}); if that call is gone, drop the call site")


@pytest.mark.parametrize("shim", [s.name for s in platform.SHIMS])
def test_only_documented_callers_use_a_shim(shim):
    documented = {site.where for site in _shim(shim).call_sites}
    undocumented = sorted(set(mc_launches.shim_hits().get(shim, {})) - documented)
    assert not undocumented, (f"shim {shim} served call sites it does not document: {undocumented}; "
                              "add them to its call sites in platform.SHIMS")


def test_installed_shims_match_the_version():
    hits = mc_launches.shim_hits()
    assert set(hits) == _installed_here(), f"installed {sorted(hits)}, expected {sorted(_installed_here())}"


def test_apply_cpu_shims_is_idempotent():
    mc_launches.assert_check("train", "apply_cpu_shims_is_idempotent")
