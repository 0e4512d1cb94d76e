#!/usr/bin/env python
"""The machine code of a CUDA source, without a GPU: compiles csrc/cuda/<file>.cu for one
architecture (nvcc -cubin), disassembles it (cuobjdump -sass) and prints, per kernel, the
instruction count, spills (LDL/STL) and the opcodes; with --against REV, the same for the
file as of git revision REV and the per-opcode differences, kernel by kernel (matched by name
with the translation-unit hash removed; when --match leaves one kernel on each side, those two).

It reads the static code, not what runs: a count that moves inside an unrolled loop body
moves the hot path; one in a tail branch does not. cuobjdump comes with the CUDA toolkit, or
from pip (`pip install nvidia-cuda-cuobjdump`, then put its nvidia/cu13/bin on PATH).

  python tools/sass_report.py csrc/cuda/kl_fused.cu --match BFloat16
  python tools/sass_report.py csrc/cuda/kl_fused.cu --against 81a2107 --match 'BFloat16ELb1E(EEv|Li1E)'
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the defines torch's extension builder passes (see tests/test_cuda_sources.py)
DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$", re.M)
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", re.M)
_TU_HASH = re.compile(r"_GLOBAL__N__[0-9a-f]+_\d+_\w+?_cu_[0-9a-f]+_\d+")


def parse_sass(text: str) -> dict:
    """{kernel name: Counter of opcodes (without modifiers)} from `cuobjdump -sass` output."""
    starts = [(m.start(), m.group(1)) for m in _FUNCTION.finditer(text)] + [(len(text), None)]
    return {name: collections.Counter(_INSTRUCTION.findall(text[a:b]))
            for (a, name), (b, _) in zip(starts, starts[1:])}


def stable_name(name: str) -> str:
    """A kernel's name without its translation unit's hash (so two builds can be matched)."""
    return _TU_HASH.sub("_GLOBAL__N_", name)


def sass_of(source_dir: Path, source: str, arch: str) -> dict:
    nvcc, cuobjdump = shutil.which("nvcc"), shutil.which("cuobjdump")
    if nvcc is None or cuobjdump is None:
        sys.exit("sass_report: needs nvcc and cuobjdump on PATH (cuobjdump: `pip install "
                 "nvidia-cuda-cuobjdump`, then add its nvidia/cu13/bin to PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "out.cubin"
        cmd = [nvcc, "-cubin", str(source_dir / source), "-o", str(cubin), f"-arch=sm_{arch}",
               "-std=c++17", "-O3", "-I", str(source_dir / "csrc" / "include"), *DEFINES]
        subprocess.run(cmd, check=True, cwd=source_dir)
        text = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True,
                              text=True).stdout
    return {stable_name(k): v for k, v in parse_sass(text).items()}


def checkout(rev: str, into: Path) -> Path:
    """csrc/ as of git revision `rev`, extracted under `into`."""
    archive = subprocess.run(["git", "archive", rev, "csrc"], check=True, capture_output=True, cwd=REPO).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _line(name: str, ops: collections.Counter, top: int) -> str:
    spills = ops["LDL"] + ops["STL"]
    common = ", ".join(f"{k} {v}" for k, v in ops.most_common(top))
    return f"{name}\n    {sum(ops.values())} instructions, {spills} spill loads/stores; {common}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a .cu file, relative to the repository root")
    parser.add_argument("--arch", default="90")
    parser.add_argument("--match", default="", help="regular expression the kernel names must match")
    parser.add_argument("--against", default=None, help="git revision to compare with")
    parser.add_argument("--top", type=int, default=12, help="opcodes listed per kernel")
    args = parser.parse_args(argv)

    new = {k: v for k, v in sass_of(REPO, args.source, args.arch).items() if re.search(args.match, k)}
    if args.against is None:
        for name, ops in sorted(new.items()):
            print(_line(name, ops, args.top))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        old_all = sass_of(checkout(args.against, Path(tmp)), args.source, args.arch)
    old = {k: v for k, v in old_all.items() if re.search(args.match, k)}
    if len(old) == 1 and len(new) == 1 and set(old) != set(new):  # one kernel each: compare them
        (old_name, ops), = old.items()
        new_name = next(iter(new))
        print(f"{args.against}: {old_name}\nnow: {new_name}")
        old = {new_name: ops}
    for name in sorted(set(new) | set(old)):
        if name not in old or name not in new:
            print(f"{name}\n    only {'now' if name in new else 'in ' + args.against}")
            continue
        a, b = old[name], new[name]
        diff = ", ".join(f"{k} {a[k]}->{b[k]}" for k in sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k]))
                         if a[k] != b[k])
        print(f"{name}\n    {sum(a.values())} -> {sum(b.values())} instructions, spills "
              f"{a['LDL'] + a['STL']} -> {b['LDL'] + b['STL']}; {diff or 'same opcodes'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
