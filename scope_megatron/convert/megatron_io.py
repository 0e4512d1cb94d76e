"""Megatron `dist_checkpointing` (torch_dist) tensors without a model in memory.

Writing (`streaming_save_strategy`): `dist_checkpointing.save` is given the sharded state dict of
a model built on the meta device, so Megatron itself decides the keys, global shapes and chunks
of every tensor (decoder layers stacked on a leading axis, SwiGLU's fc1 as two chunks, the
layers' `_extra_state` objects, and whatever the installed megatron-core adds) and writes
metadata.json and the common state. The strategy returned here replaces only the last step:
it plans torch.distributed.checkpoint write items from those descriptions and produces each
chunk's data on demand, when torch's FileSystemWriter asks for it, so one chunk is in memory at a
time. The files are the ones Megatron's own torch_dist strategy writes: tensors under their
ShardedTensor key, chunk offsets = the global offsets, objects under their unique key as
torch.save([data]).

Reading (`DistCheckpointReader`, `ShardedModelReader`): any region of a global tensor, from the
files (only the stored chunks that overlap it are loaded) or from the sharded state dict of a
model in memory.
"""
from __future__ import annotations

import io
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Protocol, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from .errors import ConversionError

Region = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (offsets, sizes) in the global tensor


def _chunk_of(sh_ten) -> Region:
    """(global offsets, sizes) of a Megatron ShardedTensor's chunk, prepended axes included."""
    return tuple(sh_ten.global_offset), (1,) * sh_ten.prepend_axis_num + tuple(sh_ten.local_shape)


def _overlap(a: Region, b: Region):
    """The intersection of two regions as (offsets, sizes), or None."""
    lo = [max(x, y) for x, y in zip(a[0], b[0])]
    hi = [min(x + s, y + t) for x, s, y, t in zip(a[0], a[1], b[0], b[1])]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return tuple(lo), tuple(h - l for l, h in zip(lo, hi))


def narrow(t: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The view of `t` at `offsets` with `sizes` (one per leading dimension given)."""
    for dim, (o, s) in enumerate(zip(offsets, sizes)):
        t = t.narrow(dim, o, s)
    return t


# ---- writing ---------------------------------------------------------------------------------


class TensorProducer(Protocol):
    """What the streaming writer asks for, per Megatron ShardedTensor (main replicas only)."""

    def dtype(self, sh_ten) -> torch.dtype:
        """The dtype to store the tensor's chunks in (asked once per chunk, before writing)."""

    def data(self, sh_ten) -> torch.Tensor:
        """The chunk's values, shaped like the ShardedTensor's local data (prepended axes
        excluded), in `dtype(sh_ten)`."""


def streaming_save_strategy(producer: TensorProducer):
    """A torch_dist save strategy for `dist_checkpointing.save` whose tensor data comes from
    `producer`, chunk by chunk, instead of from the (meta) tensors in the state dict.

    Single process (the converter's world of one). It subclasses megatron's own
    TorchDistSaveShardedStrategy because megatron-core 0.19's `save` replaces any other kind.
    """
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class StreamingTorchDistSave(TorchDistSaveShardedStrategy):
        def __init__(self):
            super().__init__("torch_dist", 1)

        def save(self, sharded_state_dict, checkpoint_dir):
            write_torch_dist(sharded_state_dict, Path(checkpoint_dir), producer)

    return StreamingTorchDistSave()


def write_torch_dist(sharded_state_dict, checkpoint_dir: Path, producer: TensorProducer) -> None:
    """Writes the main replicas of a (preprocessed) sharded state dict as torch_dist files."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica

    tensors: Dict[Tuple[str, Tuple[int, ...]], ShardedTensor] = {}
    objects: Dict[str, List] = defaultdict(list)
    items = []
    for sh in nested_values(sharded_state_dict):
        if not is_main_replica(sh.replica_id):
            continue
        if isinstance(sh, ShardedTensor):
            if sh.flattened_range is not None:
                raise ConversionError(f"internal: {sh.key} is a flattened shard (optimizer state); "
                                      "the converter writes model weights only")
            offsets, sizes = _chunk_of(sh)
            tensors[(sh.key, offsets)] = sh
            items.append(WriteItem(
                index=MetadataIndex(sh.key, torch.Size(offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=producer.dtype(sh)),
                    size=torch.Size(sh.global_shape))))
        elif isinstance(sh, ShardedObject):
            objects[sh.unique_key].append(sh)
        else:
            raise ConversionError(f"internal: unexpected {type(sh).__name__} in the state dict")
    for key in objects:
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))

    def resolve(item) -> torch.Tensor | io.BytesIO:
        if item.type == WriteItemType.BYTE_IO:
            blob = io.BytesIO()
            torch.save([obj.data for obj in objects[item.index.fqn]], blob)
            return blob
        sh = tensors[(item.index.fqn, tuple(item.index.offset))]
        data = producer.data(sh)
        expected = tuple(sh.local_shape)
        if tuple(data.shape) != expected or data.dtype != item.tensor_data.properties.dtype:
            raise ConversionError(f"internal: produced {tuple(data.shape)} {data.dtype} for {sh.key} "
                                  f"at {tuple(sh.global_offset)}, expected {expected} "
                                  f"{item.tensor_data.properties.dtype}")
        return data.reshape(item.tensor_data.chunk.sizes)

    writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1,
                                  sync_files=True)
    try:
        with warnings.catch_warnings():  # no_dist=True is the intent: one process writes everything
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({}, storage_writer=writer, planner=_StreamingPlanner(items, resolve), no_dist=True)
    except CheckpointException as exc:
        # torch wraps errors (in a BaseException): raise the producer's or the file system's own
        failure = next(iter(exc.failures.values()))
        raise failure[0] if isinstance(failure, tuple) else failure


class _StreamingPlanner(dcp.DefaultSavePlanner):
    """torch's default save planner (global plan, metadata, validation of the chunks' coverage)
    over precomputed write items whose data is resolved lazily."""

    def __init__(self, items, resolve: Callable):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = items
        self._resolve = resolve

    def create_local_plan(self):
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item):
        return self._resolve(write_item)


# ---- reading ---------------------------------------------------------------------------------


class DistCheckpointReader:
    """Regions of the tensors in a torch_dist checkpoint directory (no process group needed).

    `read` loads only the stored chunks overlapping the region (a chunk is one layer's slice of a
    TP shard in checkpoints written by Megatron or by the converter)."""

    def __init__(self, checkpoint_dir):
        self.dir = Path(checkpoint_dir)
        self._reader = dcp.FileSystemReader(str(self.dir))
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as exc:  # torch raises various errors for a missing or broken file
            raise ConversionError(f"{self.dir} holds no readable torch_dist metadata (.metadata): "
                                  f"{type(exc).__name__}: {exc}") from exc
        self._reader.set_up_storage_reader(self.metadata, True)
        self._tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                         if isinstance(v, TensorStorageMetadata)}

    def keys(self) -> List[str]:
        """The keys of the stored tensors (model and, in a training checkpoint, optimizer)."""
        return list(self._tensors)

    def shape(self, key: str) -> Tuple[int, ...]:
        """Global shape of tensor `key`."""
        return tuple(self._tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of tensor `key`."""
        return self._tensors[key].properties.dtype

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of tensor `key`, in its stored dtype."""
        out = torch.empty(tuple(sizes), dtype=self.dtype(key))
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, self._tensors[key], [chunk])
        covered = sum(torch.Size(i.lengths).numel() for i in items)
        if covered != out.numel():
            raise ConversionError(f"{self.dir}: the stored chunks of {key} cover {covered} of the "
                                  f"{out.numel()} values at offsets {tuple(offsets)}; the checkpoint "
                                  "is incomplete")
        self._reader.read_data(LoadPlan(items), _IntoTensor(out)).wait()
        return out


class _IntoTensor(dcp.DefaultLoadPlanner):
    """Load planner that copies every read item into its place in one tensor (the region's
    offsets are already subtracted in the items' dest_offsets)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def resolve_tensor(self, read_item):
        return narrow(self.out, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor):
        pass


class ShardedModelReader:
    """Regions of the global tensors of a model in memory that holds all of them (TP=1, PP=1),
    through its sharded_state_dict (the same keys and layout as its checkpoint)."""

    def __init__(self, model: torch.nn.Module):
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        sharded = model.sharded_state_dict()
        apply_factories(sharded)
        self._chunks: Dict[str, List[ShardedTensor]] = defaultdict(list)
        for sh in nested_values(sharded):
            if isinstance(sh, ShardedTensor):
                self._chunks[sh.key].append(sh)

    def keys(self) -> List[str]:
        """The keys of the model's tensors."""
        return list(self._chunks)

    def shape(self, key: str) -> Tuple[int, ...]:
        """Global shape of tensor `key`."""
        return tuple(self._chunks[key][0].global_shape)

    def dtype(self, key: str) -> torch.dtype:
        """The parameters' dtype of tensor `key`."""
        return self._chunks[key][0].data.dtype

    def pieces(self, key: str, want: Region):
        """(values, offsets within the region, sizes) of every held chunk of `key` that overlaps
        the region `want`."""
        for sh in self._chunks.get(key, []):
            chunk = _chunk_of(sh)
            both = _overlap(want, chunk)
            if both is not None:
                src = narrow(sh.data.detach().reshape(chunk[1]), [o - c for o, c in zip(both[0], chunk[0])],
                             both[1])
                yield src, [o - w for o, w in zip(both[0], want[0])], both[1]

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """A copy of the region [offsets, offsets + sizes) of tensor `key`."""
        want = (tuple(offsets), tuple(sizes))
        out = torch.empty(want[1], dtype=self.dtype(key))
        covered = 0
        for src, at, size in self.pieces(key, want):
            narrow(out, at, size).copy_(src)
            covered += src.numel()
        if covered != out.numel():
            raise ConversionError(f"the model in memory holds {covered} of the {out.numel()} values "
                                  f"of {key} at {tuple(offsets)}; export from all ranks (TP/PP) "
                                  "goes through a checkpoint")
        return out


def read_slice(reader, key: str, layer=None) -> torch.Tensor:
    """The whole tensor `key`, or its slice of decoder layer `layer` (leading axis removed)."""
    shape = reader.shape(key)
    if layer is None:
        return reader.read(key, (0,) * len(shape), shape)
    return reader.read(key, (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:])[0]


class GroupModelReader:
    """Regions of the global tensors of a model sharded over a process group (tensor and
    pipeline parallel): every rank of `group` calls read() with the same arguments in the same
    order (a collective); each contributes the values it holds and all of them get the region.
    Values held by several ranks (replicated norms, tied embeddings) are averaged, which is exact
    for identical copies held by a power-of-two number of ranks.

    model_chunks: this rank's modules (sharded_state_dict); group: e.g. Megatron's model-parallel
    group (None: the default group); device: where regions are assembled (the all-reduce runs
    there: the GPU under NCCL).
    """

    def __init__(self, model_chunks: Sequence[torch.nn.Module], group=None, device=None):
        import torch.distributed as dist

        self._local = [ShardedModelReader(chunk) for chunk in model_chunks]
        self.group = group
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        mine = {}
        for reader in self._local:
            for key in reader.keys():
                mine[key] = (reader.shape(key), str(reader.dtype(key)).replace("torch.", ""))
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
        self._meta: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        for part in everyone:
            for key, (shape, dtype) in part.items():
                self._meta.setdefault(key, (tuple(shape), getattr(torch, dtype)))

    def keys(self) -> List[str]:
        return sorted(self._meta)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        import torch.distributed as dist

        want = (tuple(offsets), tuple(sizes))
        total = torch.zeros(want[1], dtype=torch.float32, device=self.device)
        count = torch.zeros(want[1], dtype=torch.int32, device=self.device)
        for reader in self._local:
            for src, at, size in reader.pieces(key, want):
                narrow(total, at, size).add_(src.to(self.device, torch.float32))
                narrow(count, at, size).add_(1)
        dist.all_reduce(total, group=self.group)
        dist.all_reduce(count, group=self.group)
        if bool((count == 0).any()):
            raise ConversionError(f"no rank of the group holds part of {key} at {tuple(offsets)}; "
                                  "read from the model-parallel group that holds the whole model")
        return (total / count).to(self.dtype(key))

