"""Atomic output directories: everything is written into a hidden temporary sibling and renamed
into place at the end, so a failed or killed conversion never leaves a directory that looks like
a valid checkpoint or model (at worst a `.<name>.tmp-*` directory, removed on failure)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from scope_megatron.utils.files import fsync_path, fsync_tree

from .errors import ConversionError


class StagedOutput:
    """with StagedOutput(out, overwrite=..., kind=..., holds=...) as tmp: write into tmp, then
    `commit()`; leaving the block without commit (an error) removes tmp.

    kind: what the directory holds, for messages ("Megatron checkpoint", "Hugging Face model").
    holds(path) -> bool: whether an existing directory holds such an output. `out` may be absent
    or an empty directory; one holding an output is replaced only with overwrite=True; any other
    content is never replaced (a mistyped path must not delete unrelated files). The check runs
    on construction (before any work) and again at commit.
    """

    def __init__(self, out, *, overwrite: bool, kind: str, holds: Callable[[Path], bool]):
        self.out = Path(out).absolute()
        self.overwrite, self.kind, self.holds = overwrite, kind, holds
        self.tmp = None
        self.check()

    def check(self) -> None:
        out = self.out
        if not out.exists():
            return
        if not out.is_dir():
            raise ConversionError(f"output {out} exists and is not a directory; choose another path")
        if next(out.iterdir(), None) is None:
            return
        if not self.holds(out):
            raise ConversionError(f"output {out} is not empty and holds no {self.kind}; choose a new "
                                  "or empty directory (it is never replaced)")
        if not self.overwrite:
            raise ConversionError(f"output {out} already holds a {self.kind}; pass --overwrite "
                                  "(overwrite=True) to replace it, or choose another directory")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def commit(self) -> Path:
        """Moves the finished output into place (replacing an old one as allowed); returns it."""
        fsync_tree(self.tmp)
        self.check()
        old = None
        if self.out.exists():
            if next(self.out.iterdir(), None) is None:
                self.out.rmdir()
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
                os.rename(self.out, old / "replaced")
        os.rename(self.tmp, self.out)
        fsync_path(self.out.parent)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old)
        return self.out

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
