"""Build script for the scope_megatron._C extension (C++ kernels, plus CUDA kernels when a CUDA
toolkit and a CUDA-enabled torch are present).

Build against the installed torch, without build isolation (an isolated build would fetch
another torch):  pip install --no-build-isolation -e .
Environment:
  SCOPE_MEGATRON_CUDA=0|1   force the CUDA kernels off / on (default: on when possible)
  TORCH_CUDA_ARCH_LIST      CUDA architectures, e.g. "9.0" (torch's default otherwise)
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - build-time guidance
    raise SystemExit(
        "scope_megatron builds against an installed torch. Install torch first "
        "(CPU machines: pip install torch==2.13.0), then: pip install --no-build-isolation -e ."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def _with_cuda() -> bool:
    flag = os.environ.get("SCOPE_MEGATRON_CUDA", "").strip()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1" and not possible:
        raise SystemExit(
            "SCOPE_MEGATRON_CUDA=1 but this torch has no CUDA support "
            f"(torch.version.cuda={torch.version.cuda}) or no CUDA toolkit was found "
            f"(CUDA_HOME={CUDA_HOME})."
        )
    return possible


def _rel(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


with_cuda = _with_cuda()
sources = _rel("csrc/cpu/*.cpp") + ["csrc/torch/registration.cpp", "csrc/torch/ops_cpu.cpp"]
# -fopenmp: at::parallel_for is header code that only runs in parallel when compiled with OpenMP
# (the linker then resolves libgomp.so.1 to the copy torch already loaded).
# -fno-trapping-math lets the compiler if-convert the clamps in the exp polynomial, which the row
# loops need in order to vectorize; nothing here relies on floating-point exceptions.
cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
link_flags = ["-fopenmp"]
nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
define_macros = []
if with_cuda:
    sources += _rel("csrc/cuda/*.cu") + ["csrc/torch/ops_cuda.cpp"]
    define_macros.append(("SCOPE_WITH_CUDA", "1"))
    extension_cls = CUDAExtension
    extra_compile_args = {"cxx": cxx_flags, "nvcc": nvcc_flags}
else:
    extension_cls = CppExtension
    extra_compile_args = {"cxx": cxx_flags}

setup(
    ext_modules=[
        extension_cls(
            name="scope_megatron._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc", "include")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=link_flags,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
