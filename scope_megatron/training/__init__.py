"""Megatron-core training for SCOPE (docs/megatron-platform.md).

  platform    distributed start-up, Megatron's parallel state, seeding, the CPU shims (the only
              module that knows whether CUDA is present)
  models      ModelConfig (Llama / Qwen2 / Qwen3 presets), vocabulary padding, GPTModel
              construction, the frozen teacher's helpers
  parallel    Megatron DDP and optimizer around the model chunks
  checkpoint  atomic, reshardable dist_checkpointing checkpoints (model, optimizer, scheduler,
              RNG, the caller's state)

None of them imports megatron at import time: on a CPU machine call
platform.apply_cpu_shims() before megatron.core is imported (megatron-core 0.19 imports triton).
"""
