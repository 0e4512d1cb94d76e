"""SCOPE training entry point: `torchrun --nproc-per-node 2 examples/pretrain_scope.py`.

The Megatron-core trainer is not implemented yet (it is the trainer issue). Until then this entry
point checks the environment the trainer will run in: it joins the process group torchrun set up
(gloo on CPU, NCCL on GPU), treats all ranks as one tensor-parallel group, and runs the
vocab-parallel ops on a random vocabulary shard per rank against the plain-PyTorch reference.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main() -> int:
    use_cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    from scope_megatron.ops import vocab_parallel_kl, vocab_parallel_logprob
    from scope_megatron.ops.reference import kl_reference, logprob_reference

    gen = torch.Generator().manual_seed(1234)  # same full tensors on every rank
    tokens, local_vocab = 64, 1000
    student = torch.randn(tokens, world * local_vocab, generator=gen)
    teacher = torch.randn(tokens, world * local_vocab, generator=gen)
    target = torch.randint(0, world * local_vocab, (tokens,), generator=gen)
    shard = slice(rank * local_vocab, (rank + 1) * local_vocab)
    group = dist.group.WORLD if dist.is_initialized() else None
    kl = vocab_parallel_kl(student[:, shard].to(device), teacher[:, shard].to(device), tp_group=group)
    lp = vocab_parallel_logprob(student[:, shard].to(device), target.to(device), tp_group=group)
    kl_err = float((kl.cpu() - kl_reference(student, teacher)).abs().max())
    lp_err = float((lp.cpu() - logprob_reference(student, target)).abs().max())
    if rank == 0:
        print(f"[scope-megatron] environment OK: {world} rank(s), device {device.type}, "
              f"vocab-parallel KL / log-prob max error vs reference {kl_err:.1e} / {lp_err:.1e}")
        print("[scope-megatron] the SCOPE trainer is not implemented yet (trainer issue): "
              "nothing was trained.")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if max(kl_err, lp_err) < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
