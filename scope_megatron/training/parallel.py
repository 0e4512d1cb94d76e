"""Megatron DDP and optimizer around model chunks, wired the way Megatron's schedules expect.

    chunks = models.build_model_chunks(cfg)
    ddp_chunks = parallel.wrap_ddp(chunks, use_distributed_optimizer=True)
    optimizer = parallel.build_optimizer(ddp_chunks, lr=3e-4, use_distributed_optimizer=True)
    # then get_forward_backward_func()(..., model=ddp_chunks, ...) and optimizer.step()

The frozen teacher is never wrapped: it holds no gradient buffers and no optimizer state.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def wrap_ddp(model_chunks: Sequence[torch.nn.Module], *, use_distributed_optimizer: bool = False,
             overlap_grad_reduce: bool = False, grad_reduce_in_fp32: bool = True,
             bucket_size: Optional[int] = None) -> List[torch.nn.Module]:
    """Wraps each chunk in Megatron's DistributedDataParallel (contiguous gradient buffers,
    bucketed data-parallel reduction) and sets the chunks' config hooks the schedules use:
    finalize_model_grads_func (DP reduction, tied-embedding and layernorm all-reduces) and,
    with overlap_grad_reduce, no_sync_func (gradients reduce once per step, not per micro-batch).

    use_distributed_optimizer: shard optimizer state and reduce-scatter gradients across DP (the
      optimizer must be built with the same setting).
    overlap_grad_reduce: start each bucket's reduction during the backward pass.
    grad_reduce_in_fp32: accumulate and reduce gradients in fp32 (recommended for bf16).
    bucket_size: elements per reduction bucket (None: Megatron's default).
    """
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer, bucket_size=bucket_size)
    wrapped = [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=i > 0)
               for i, chunk in enumerate(model_chunks)]
    no_sync = [chunk.no_sync for chunk in wrapped]
    for chunk in wrapped:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        if overlap_grad_reduce:
            chunk.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return wrapped


def build_optimizer(ddp_chunks: Sequence[torch.nn.Module], *, lr: float, min_lr: float = 0.0,
                    weight_decay: float = 0.0, adam_beta1: float = 0.9, adam_beta2: float = 0.95,
                    adam_eps: float = 1e-8, clip_grad: float = 1.0,
                    use_distributed_optimizer: bool = False, **optimizer_overrides):
    """Megatron's Adam(W) over the DDP-wrapped chunks, with gradient clipping by global norm
    (clip_grad, 0 to disable) across all model-parallel ranks. Mixed precision follows the
    chunks' TransformerConfig (bf16 / fp16 main params in fp32). `optimizer_overrides` are
    further OptimizerConfig fields. Sets config.grad_scale_func (the fp16 loss scale)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model_config = ddp_chunks[0].config
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, adam_eps=adam_eps, clip_grad=clip_grad,
        use_distributed_optimizer=use_distributed_optimizer,
        bf16=model_config.bf16, fp16=model_config.fp16, params_dtype=model_config.params_dtype,
        **optimizer_overrides)
    optimizer = get_megatron_optimizer(config, list(ddp_chunks))
    for chunk in ddp_chunks:
        chunk.config.grad_scale_func = optimizer.scale_loss
    return optimizer
