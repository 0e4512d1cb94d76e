"""Hugging Face checkpoint directories: a lazy safetensors reader and a streaming writer.

Reading opens a shard per tensor (`safe_open`, memory-mapped) and closes it right away, so only the
tensor being converted is resident. Writing lays out each shard's header from the planned names,
shapes and dtypes first, then streams the tensors into place one at a time: neither direction
holds more than the tensors of one rule in memory.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from .errors import ConversionError

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# weight files of other formats never copied from a template
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_config(hf_dir: Path) -> dict:
    """config.json of an HF model directory (ConversionError when missing or not JSON)."""
    path = Path(hf_dir) / CONFIG
    if not path.is_file():
        raise ConversionError(f"{hf_dir} is not a Hugging Face model directory: {CONFIG} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: Tuple[int, ...]
    dtype: torch.dtype


class HFCheckpoint:
    """The safetensors weights of an HF model directory, read lazily.

    Construction validates the directory: config.json, the weight files (model.safetensors, or the
    shards named by model.safetensors.index.json — each must exist) and every file's header (a
    truncated or corrupt file is named). Only headers are read here.
    """

    def __init__(self, hf_dir):
        from safetensors import SafetensorError, safe_open

        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"HF model directory {self.dir} does not exist")
        self.config = read_config(self.dir)
        files = self._weight_files()
        self.tensors: Dict[str, TensorInfo] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        piece = f.get_slice(name)
                        kind = piece.get_dtype()
                        if kind not in _DTYPES:
                            hint = "a quantized checkpoint? " if kind.startswith("F8") else ""
                            raise ConversionError(f"{file}: tensor {name} has dtype {kind}, which the converter "
                                                  f"does not read ({hint}convert the bf16 / fp16 / fp32 "
                                                  "release of the model)")
                        self.tensors[name] = TensorInfo(file, tuple(piece.get_shape()), _DTYPES[kind])
            except SafetensorError as exc:
                raise ConversionError(f"{file} is truncated or not a safetensors file ({exc}); "
                                      "download or copy it again") from exc
        self._check_index(files)

    def _weight_files(self) -> List[Path]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                self._index = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index} is not a safetensors index (no weight_map): {exc}") from exc
            files = sorted({self.dir / name for name in self._index.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"{index} names shard file(s) missing from {self.dir}: "
                                      f"{', '.join(missing)}; download every shard")
            return files
        self._index = None
        if (self.dir / SINGLE_FILE).is_file():
            return [self.dir / SINGLE_FILE]
        other = sorted(p.name for p in self.dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(other)}: convert them to safetensors first)" if other else ""
        raise ConversionError(f"{self.dir} holds no safetensors weights: neither {SINGLE_FILE} nor "
                              f"{INDEX}{hint}")

    def _check_index(self, files: Sequence[Path]) -> None:
        if self._index is None:
            return
        wrong = [n for n, f in self._index.items()
                 if n not in self.tensors or self.tensors[n].file.name != f]
        if wrong:
            raise ConversionError(f"{self.dir / INDEX} does not match the shards: "
                                  f"{', '.join(sorted(wrong)[:5])} not found in the file it names")

    def read(self, name: str) -> torch.Tensor:
        """One tensor, loaded from its shard (the shard is mapped only during the call)."""
        from safetensors import safe_open

        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)


def parse_size(size) -> int:
    """Bytes of a size given as an int or a string like "5GB", "500MB", "2GiB"."""
    text = str(size).strip().upper()
    try:
        for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9),
                             ("MB", 10**6), ("KB", 10**3), ("B", 1)):
            if text.endswith(unit):
                value = int(float(text[:-len(unit)]) * factor)
                break
        else:
            value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConversionError(f"max shard size {size!r} is not a size: give bytes (an integer >= 1) or "
                              "a number with a unit, e.g. 5GB, 500MB, 2GiB")
    return value


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsWriter:
    """Writes planned tensors into safetensors shards, streaming one tensor at a time.

    plan: every tensor, in the order `write` will be called. Shards are filled in plan order up to
    max_shard_bytes each (a larger tensor gets a shard of its own); one shard is model.safetensors,
    several are model-0000i-of-0000n.safetensors with model.safetensors.index.json. `write` checks
    name, shape and dtype against the plan; `close` checks that everything was written.
    """

    def __init__(self, out_dir: Path, plan: Sequence[PlannedTensor], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.plan = list(plan)
        shards: List[List[PlannedTensor]] = [[]]
        size = 0
        for t in self.plan:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.shards = [(SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors", s)
                       for i, s in enumerate(shards)]
        self._next = 0          # index into plan
        self._shard = -1
        self._file = None
        self._remaining: List[PlannedTensor] = []

    def _open_next_shard(self) -> None:
        self._shard += 1
        name, tensors = self.shards[self._shard]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in tensors:
            header[t.name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(self.out_dir / name, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._remaining = list(tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Appends the next planned tensor."""
        expected = self.plan[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (expected.name, expected.shape, expected.dtype):
            raise ConversionError(f"internal: wrote {name} {tuple(tensor.shape)} {tensor.dtype}, "
                                  f"planned {expected.name} {expected.shape} {expected.dtype}")
        if not self._remaining:
            self._close_shard()
            self._open_next_shard()
        self._remaining.pop(0)
        data = tensor.detach().cpu().contiguous()
        self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> List[str]:
        """Finishes the last shard and writes the index (several shards); returns the files."""
        if self._next != len(self.plan) or self._remaining:
            raise ConversionError(f"internal: {len(self.plan) - self._next} planned tensors were "
                                  "not written")
        self._close_shard()
        files = [name for name, _ in self.shards]
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.plan)},
                     "weight_map": {t.name: name for name, ts in self.shards for t in ts}}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            files.append(INDEX)
        return files

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def copy_template_files(template_dir: Path, out_dir: Path) -> List[str]:
    """Copies every regular file of an HF directory except its weights and config.json
    (tokenizer files, generation_config.json, chat template, ...); returns their names."""
    copied = []
    for path in sorted(Path(template_dir).iterdir()):
        if not path.is_file() or path.name == CONFIG or path.name.endswith(_WEIGHT_SUFFIXES) \
                or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, out_dir / path.name)
        copied.append(path.name)
    return copied


def dtype_name(dtype: torch.dtype) -> str:
    """transformers' name of a dtype in config.json ("float32", "bfloat16", ...)."""
    return str(dtype).replace("torch.", "")
