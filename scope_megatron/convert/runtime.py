"""The Megatron side of a conversion process: a one-process parallel state and a model built on
the meta device (its structure and sharded_state_dict without any memory for weights)."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from scope_megatron.training import models, platform
from scope_megatron.training.models import ModelConfig

from .errors import ConversionError


@contextlib.contextmanager
def single_process_megatron():
    """Megatron's parallel state for one process at TP=1, PP=1: what describing a whole model
    needs. Creates (and afterwards destroys) a gloo group of one and the parallel state unless
    they exist already in that form; applies the CPU shims on a machine without CUDA. A larger
    world (torchrun) is refused: the conversion is single-process I/O."""
    made_group = made_layout = False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConversionError("run the HF -> Megatron conversion as one process (python, not "
                                  "torchrun); --tp/--pp only choose the layout it is checked for")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        made_group = True
    try:
        if dist.get_world_size() != 1:
            raise ConversionError(f"the HF -> Megatron conversion runs in a world of one process, "
                                  f"this one has {dist.get_world_size()}")
        if not platform.cuda_available():
            platform.apply_cpu_shims()
        try:
            lay = platform.layout()
        except RuntimeError:
            platform.initialize_parallel(1, 1)
            made_layout = True
        else:
            if (lay.tp, lay.pp, lay.vpp) != (1, 1, None):
                raise ConversionError(f"the conversion needs Megatron's parallel state at TP=1 PP=1, "
                                      f"this process has TP={lay.tp} PP={lay.pp}")
        yield
    finally:
        if made_layout:
            platform.destroy_parallel()
        if made_group:
            dist.destroy_process_group()


def build_meta_model(cfg: ModelConfig):
    """The GPTModel of `cfg` (whole model, TP=1, PP=1, Megatron's local layers) with every
    parameter on the meta device. Same structure and checkpoint keys as
    `models.build_gpt_model` (TransformerEngine's layers use the same keys). Needs
    `single_process_megatron()`."""
    from megatron.core.models.gpt import GPTModel

    config = models.transformer_config(cfg, perform_initialization=False, use_cpu_initialization=True)
    with torch.device("meta"):
        model = GPTModel(
            config=config, transformer_layer_spec=models.layer_spec(cfg, use_te=False),
            vocab_size=cfg.padded_vocab_size(1), max_sequence_length=cfg.max_position_embeddings,
            pre_process=True, post_process=True, parallel_output=True,
            share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
            position_embedding_type="rope", rotary_base=cfg.rotary_base)
    model.scope_model_config = cfg
    return model


def pin_malloc_mmap_threshold(threshold: int = 128 << 10) -> bool:
    """Makes glibc serve every allocation above `threshold` bytes with its own mapping, returned to
    the system when freed (mallopt M_MMAP_THRESHOLD, which also stops glibc from raising the
    threshold after each freed large block). Without it, glibc keeps freed tensors of up to 32 MiB
    in its heap, and a conversion's resident memory drifts tens of MiB above what it holds. For
    the conversion tools' own processes (it changes the allocator process-wide); returns whether
    it took effect (False off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))   # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
