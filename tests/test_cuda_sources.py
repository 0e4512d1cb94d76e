"""The CUDA sources compile without a GPU: every csrc/cuda/*.cu with nvcc for sm_80 and sm_90
with no register spills, and the torch bindings csrc/torch/ops_cuda.cpp with the host compiler
against the installed torch (CPU builds included), resolving every launcher they call against
the kernels' objects. Skipped where nvcc or a host compiler is missing."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")
# The defines torch's extension builder passes to nvcc: the kernels must use the fp16 / bf16
# intrinsics, not the implicit conversions these disable.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


NVCC = _nvcc()
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def cuda_objects(tmp_path_factory):
    """Compiles each .cu file once (both architectures in one nvcc call, in parallel across
    files). Returns {source name: (object path, CompletedProcess)}."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]

    def compile_one(src: Path):
        obj = out_dir / (src.stem + ".o")
        cmd = [NVCC, "-c", str(src), "-o", str(obj), *gencode, "-std=c++17", "-O3",
               "-Xptxas", "-v", "-I", str(ROOT / "csrc" / "include"), *TORCH_NVCC_DEFINES]
        return src.name, (obj, _run(cmd))

    with ThreadPoolExecutor(max_workers=max(1, min(len(CUDA_SOURCES), os.cpu_count() or 1))) as pool:
        return dict(pool.map(compile_one, CUDA_SOURCES))


# ptxas -v prints, per kernel and architecture:
#   ptxas info    : Compiling entry function '<mangled>' for 'sm_90'
#   ptxas info    : Function properties for <mangled>
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 40 registers, ...
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas_report(text: str) -> list:
    """[(kernel, arch, registers, spill_stores, spill_loads)] from a ptxas -v report."""
    kernels, current, spills = [], None, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current, spills = m.groups(), None
        elif (m := _SPILLS.search(line)) and current is not None:
            spills = (int(m.group(2)), int(m.group(3)))
        elif (m := _REGISTERS.search(line)) and current is not None:
            assert spills is not None, f"no spill line for {current[0]} in the ptxas report"
            kernels.append((current[0], current[1], int(m.group(1)), *spills))
            current = None
    return kernels


def _demangle(names: list) -> list:
    """Readable kernel names (c++filt, without the namespaces), or the mangled ones."""
    if not names or shutil.which("c++filt") is None:
        return names
    lines = _run(["c++filt", *names]).stdout.splitlines()
    if len(lines) != len(names):
        return names
    return [re.sub(r"scope_kernels::|cuda::|\(anonymous namespace\)::", "", line).split("(")[0]
            for line in lines]


def test_ptxas_report_parser():
    report = """\
ptxas info    : Compiling entry function '_Z1fv' for 'sm_90'
ptxas info    : Function properties for _Z1fv
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 64 bytes smem
"""
    assert parse_ptxas_report(report) == [("_Z1fv", "sm_90", 40, 4, 12)]


def test_cuda_sources_exist():
    assert {p.name for p in CUDA_SOURCES} >= {"logprob.cu", "kl.cu", "scalar_ops.cu"}


@pytest.mark.parametrize("source", [p.name for p in CUDA_SOURCES])
def test_cu_compiles_without_spills(source, cuda_objects):
    _, result = cuda_objects[source]
    assert result.returncode == 0, f"nvcc failed on {source}:\n{result.stdout}\n{result.stderr}"
    kernels = parse_ptxas_report(result.stdout + result.stderr)
    archs = {arch for _, arch, *_ in kernels}
    assert archs == {f"sm_{a}" for a in ARCHS}, f"ptxas report of {source} lists {archs}"
    names = _demangle([name for name, *_ in kernels])
    for (_, arch, regs, *_), name in sorted(zip(kernels, names), key=lambda k: (k[0][1], k[1])):
        print(f"{source} {arch} {regs:3d} registers  {name}")  # the report of `pytest -s`
    spilling = [(name, arch, st, ld) for (_, arch, _, st, ld), name in zip(kernels, names)
                if st or ld]
    assert not spilling, f"register spills (kernel, arch, store bytes, load bytes): {spilling}"


def _torch_include_flags():
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()]


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_torch_bindings_compile_and_link_against_kernels(cuda_objects, tmp_path):
    """ops_cuda.cpp compiles against the installed torch (no CUDA headers needed), and every
    scope_kernels::cuda function it references is defined by the kernels' objects (the explicit
    instantiations match the declarations of cuda_ops.h)."""
    obj = tmp_path / "ops_cuda.o"
    cmd = [CXX, "-std=c++20", "-c", "-fPIC", "-O0", "-DSCOPE_WITH_CUDA", "-Wall",
           "-I", str(ROOT / "csrc" / "include"), *_torch_include_flags(),
           str(ROOT / "csrc" / "torch" / "ops_cuda.cpp"), "-o", str(obj)]
    result = _run(cmd)
    assert result.returncode == 0, f"ops_cuda.cpp failed to compile:\n{result.stderr}"

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found: cannot check the symbols")

    def symbols(path, kinds):
        listing = _run([nm, str(path)]).stdout
        return {parts[-1] for parts in map(str.split, listing.splitlines())
                if len(parts) >= 2 and parts[-2] in kinds and "scope_kernels" in parts[-1]}

    needed = symbols(obj, {"U"})
    assert needed, "ops_cuda.cpp references no scope_kernels function: nothing is registered?"
    defined = set()
    for name, (cu_obj, result) in cuda_objects.items():
        assert result.returncode == 0, f"nvcc failed on {name}"
        defined |= symbols(cu_obj, {"T", "W"})
    missing = sorted(needed - defined)
    assert not missing, f"launchers called by the bindings but not instantiated: {_demangle(missing)}"
