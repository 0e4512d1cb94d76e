"""Data: the toy arithmetic world of the embedded default, its tokenizer, and batching helpers.

  CharTokenizer, PAD_ID, BOS_ID, EOS_ID      fixed-vocabulary character tokenizer
  ToyArithmetic, ToyArithmeticConfig,        the toy addition task: prompts, carry-trace
  AdditionProblem, TOY_TOKENIZER             solutions, splits, corruption hook
  FAMILIES, family                           named problem families (breakdowns, blind spots)
  make_prompt_batch, PromptBatch             prompts -> [B, P] ids + mask, group ids for G rollouts
  make_sft_batch, SFTBatch                   prompt + response -> tokens + response mask
  PromptDataset, PromptItem, DEFAULT_SUFFIX  training prompts from JSONL/JSON/Parquet files:
                                             tokenized, length-filtered, resumable order
  encode_prompts                             user messages -> prompt ids (chat template or plain)
  stop_token_ids                             an HF model's stop ids: the tokenizer's eos plus the
                                             eos_token_id of generation_config.json / config.json

No Megatron here: the trainer's glue calls into this package.
"""
from .batching import PromptBatch, SFTBatch, make_prompt_batch, make_sft_batch
from .prompts import DEFAULT_SUFFIX, PromptDataset, PromptItem, encode_prompts
from .stop_ids import stop_token_ids
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, CharTokenizer
from .toy_arithmetic import (FAMILIES, TOY_SYMBOLS, TOY_TOKENIZER, TRACE_STYLES, AdditionProblem,
                             ToyArithmetic, ToyArithmeticConfig, family)

__all__ = [
    "CharTokenizer", "SPECIAL_TOKENS", "PAD_ID", "BOS_ID", "EOS_ID",
    "ToyArithmetic", "ToyArithmeticConfig", "AdditionProblem", "TOY_SYMBOLS", "TOY_TOKENIZER",
    "TRACE_STYLES", "FAMILIES", "family",
    "PromptBatch", "make_prompt_batch", "SFTBatch", "make_sft_batch",
    "PromptDataset", "PromptItem", "DEFAULT_SUFFIX", "encode_prompts", "stop_token_ids",
]
