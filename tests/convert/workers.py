"""Workers of the conversion tests, run in real gloo process groups (tests/distributed.py). The
pytest side builds the HF models into $SCOPE_CONVERT_WORKSPACE/hf/<name> first. Each launch runs
many named checks and returns their tracebacks (None = passed), their durations and
measurements; one launch per world size, because each process pays megatron's import.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path

import tests.training.mc_megatron_src  # noqa: F401  (SCOPE_TEST_MEGATRON_SRC, before megatron)
import torch
import torch.distributed as dist

from tests.convert.hf_models import TINY, build_hf_model, write_random_llama
from tests.distributed import run_checks

CONVERTED_TP2 = "llama_gqa_untied_tp2"   # converted with tp=2: 256 padded rows
REPO = Path(__file__).resolve().parents[2]


def run_timed(checks: dict, ctx) -> dict:
    """tests.distributed.run_checks, plus each check's seconds."""
    seconds = {}

    def timed(name, fn):
        def run(c):
            start = time.perf_counter()
            try:
                fn(c)
            finally:
                seconds[name] = round(time.perf_counter() - start, 2)
        return run

    return {"checks": run_checks({n: timed(n, f) for n, f in checks.items()}, ctx), "seconds": seconds}


def workspace() -> Path:
    return Path(os.environ["SCOPE_CONVERT_WORKSPACE"])


def hf_weights(hf_dir: Path) -> dict:
    from scope_megatron.convert.hf_io import HFCheckpoint

    ckpt = HFCheckpoint(hf_dir)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def assert_same_weights(expected_dir: Path, got_dir: Path) -> None:
    """Bit-exact: the same tensor names, shapes, dtypes and values."""
    want, got = hf_weights(expected_dir), hf_weights(got_dir)
    assert sorted(want) == sorted(got), sorted(set(want) ^ set(got))
    for name in want:
        assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), name


def _tokens(vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _expect_error(fn, message: str) -> None:
    from scope_megatron.convert import ConversionError

    try:
        fn()
    except ConversionError as exc:
        assert message in str(exc), str(exc)
    else:
        raise AssertionError(f"no ConversionError ({message!r} expected)")


# ---- one process -------------------------------------------------------------------------------


def single(ctx):
    """World of one: the memory of both directions (first, in a fresh process), HF -> Megatron ->
    HF at TP=1 for every tiny model (from the checkpoint and from a model in memory), sharded
    output, overwriting, atomicity of a failed conversion, and the end-to-end run."""
    from scope_megatron.convert import convert_hf_to_megatron, export_hf
    from scope_megatron.convert.hf_io import INDEX
    from scope_megatron.convert.runtime import pin_malloc_mmap_threshold
    from scope_megatron.training import platform

    assert pin_malloc_mmap_threshold()   # as the conversion tools do (glibc)
    platform.apply_cpu_shims()
    ws = workspace()
    hf, mg, back = ws / "hf", ws / "mg", ws / "back"
    measured = {}

    def convert_all(_):
        for name in TINY:
            convert_hf_to_megatron(hf / name, mg / name)
        convert_hf_to_megatron(hf / "llama_gqa_untied", mg / CONVERTED_TP2, tp=2, role="teacher")

    def overwrite_replaces_only_with_permission(_):
        out = ws / "again"
        convert_hf_to_megatron(hf / "llama_tied", out)
        _expect_error(lambda: convert_hf_to_megatron(hf / "qwen3_qknorm", out), "already holds")
        convert_hf_to_megatron(hf / "qwen3_qknorm", out, overwrite=True)
        assert json.loads((out / "iter_0000000" / "scope_checkpoint.json").read_text())[
            "conversion"]["architecture"] == "Qwen3ForCausalLM"
        assert sorted(p.name for p in ws.iterdir() if p.name.startswith(".again")) == []

    def tensors_disagreeing_with_config(_):
        bad = ws / "bad-config"
        shutil.copytree(hf / "llama_tied", bad)
        config = json.loads((bad / "config.json").read_text())
        for change, message in ((dict(intermediate_size=64),
                                 "gate_proj.weight [96, 64] (config.json implies [64, 64])"),
                                (dict(num_hidden_layers=3), "lacks tensors a LlamaForCausalLM with "
                                 "this config.json has: model.layers.2.")):
            (bad / "config.json").write_text(json.dumps(dict(config, **change)))
            _expect_error(lambda: convert_hf_to_megatron(bad, ws / "bad-out"), message)
            assert not (ws / "bad-out").exists()

    def bit_exact_from_checkpoint(_):
        for name in TINY:
            export_hf(mg / name, hf / name, back / name)
            assert_same_weights(hf / name, back / name)

    def sharded_output_with_index(_):
        result = export_hf(mg / "qwen3_qknorm", hf / "qwen3_qknorm", ws / "sharded", max_shard_size="30KB")
        index = json.loads((ws / "sharded" / INDEX).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and all((ws / "sharded" / s).is_file() for s in shards), shards
        assert INDEX in result.files and "model.safetensors" not in result.files
        assert_same_weights(hf / "qwen3_qknorm", ws / "sharded")

    def bit_exact_from_memory_tp1(_):
        from scope_megatron.training import checkpoint, models

        platform.initialize_parallel(1, 1)
        try:
            for name in ("qwen2_bias_sharded", "qwen3_qknorm"):
                cfg = models.ModelConfig(**checkpoint.checkpoint_info(mg / name)["model_config"])
                chunks = models.build_model_chunks(cfg)
                checkpoint.load_checkpoint(mg / name, chunks)
                export_hf(chunks, hf / name, ws / "memory" / name)
                assert_same_weights(hf / name, ws / "memory" / name)
        finally:
            platform.destroy_parallel()

    def failure_midway_leaves_nothing(_):
        from scope_megatron.convert import hf_io

        read, calls = hf_io.HFCheckpoint.read, []

        def failing_read(self, name):
            calls.append(name)
            if len(calls) == 7:
                raise OSError("disk vanished")
            return read(self, name)

        hf_io.HFCheckpoint.read = failing_read
        try:
            convert_hf_to_megatron(hf / "qwen3_qknorm", ws / "broken")
            raise AssertionError("the conversion did not fail")
        except OSError as exc:
            assert "disk vanished" in str(exc)
        finally:
            hf_io.HFCheckpoint.read = read
        assert not (ws / "broken").exists()
        assert not [p.name for p in ws.iterdir() if p.name.startswith(".broken")]

    checks = {"memory": lambda c: measured.update(memory=_memory(c, ws)),
              "convert_all": convert_all,
              "overwrite_replaces_only_with_permission": overwrite_replaces_only_with_permission,
              "tensors_disagreeing_with_config": tensors_disagreeing_with_config,
              "bit_exact_from_checkpoint": bit_exact_from_checkpoint,
              "sharded_output_with_index": sharded_output_with_index,
              "bit_exact_from_memory_tp1": bit_exact_from_memory_tp1,
              "failure_midway_leaves_nothing": failure_midway_leaves_nothing,
              "end_to_end": lambda c: measured.update(end_to_end=_end_to_end(c, ws / "e2e"))}
    return dict(run_timed(checks, ctx), **measured)


def _memory(ctx, ws: Path) -> dict:
    """Peak resident memory above the start of each direction for random Llamas of 8 and 24
    layers, after a warm-up conversion (imports and first-use allocations are not counted), in a
    process whose glibc mmap threshold is pinned like the tools' (freed tensors go back to the
    system, so the peak shows what the converter holds, not what the allocator keeps)."""
    from scope_megatron.convert import convert_hf_to_megatron, export_hf
    from scope_megatron.utils.memory import PeakMemory

    ws = ws / "memory-test"
    convert_hf_to_megatron(ws.parent / "hf" / "llama_tied", ws / "warm-mg")
    export_hf(ws / "warm-mg", ws.parent / "hf" / "llama_tied", ws / "warm-hf")
    out = {}
    for layers in (8, 24):
        hf, mg, back = ws / f"hf{layers}", ws / f"mg{layers}", ws / f"back{layers}"
        sizes = write_random_llama(hf, layers=layers, hidden=384, heads=6, groups=2, ffn=1024,
                                   vocab=1000, seed=ctx.seed, shard_bytes=40 << 20)
        gc.collect()
        with PeakMemory() as to_megatron:
            convert_hf_to_megatron(hf, mg)
        gc.collect()
        with PeakMemory() as to_hf:
            export_hf(mg, hf, back, max_shard_size=40 << 20)
        assert_same_weights(hf, back)
        out[layers] = dict(sizes, hf_to_megatron=to_megatron.extra_bytes, megatron_to_hf=to_hf.extra_bytes)
    shutil.rmtree(ws)
    return out


def _end_to_end(ctx, ws: Path) -> dict:
    """A Qwen3 HF model on the toy task's 18-token vocabulary -> convert -> 2 SCOPE steps with the
    Trainer (the toy teacher, both padded to 32 rows) -> export from the saved checkpoint and
    from the trainer's chunks in memory -> transformers: logits and greedy generation."""
    from transformers import AutoModelForCausalLM

    from scope_megatron.convert import convert_hf_to_megatron, export_hf
    from scope_megatron.data.toy_arithmetic import TOY_TOKENIZER
    from scope_megatron.training import models
    from scope_megatron.training.config import TOY_PADDED_VOCAB, load_config
    from scope_megatron.training.trainer import Trainer

    hf = build_hf_model(ws / "qwen3-toy", "Qwen3ForCausalLM",
                        dict(vocab_size=TOY_TOKENIZER.vocab_size, num_key_value_heads=2, head_dim=16,
                             tie_word_embeddings=True, rope_theta=1e6), ctx.seed)
    (hf / "tokenizer_config.json").write_text(json.dumps({"note": "copied into every export"}))
    converted = convert_hf_to_megatron(hf, ws / "mg", padded_vocab=TOY_PADDED_VOCAB)
    cfg = load_config([
        "--config", str(converted.yaml_path), "--load", str(converted.path),
        "--teacher-load", str(REPO / "checkpoints/toy/teacher"), "--train-iters", "2",
        "--prompts-per-step", "2", "--n-samples-per-prompt", "4", "--micro-batch-size", "8",
        "--rollout-max-response-len", "24", "--eval-interval", "0", "--save-interval", "2",
        "--save", str(ws / "run" / "ckpt"), "--log-dir", str(ws / "run" / "logs"),
        "--logging-tensorboard", "false", "--seed", str(ctx.seed % 100000)])
    trainer = Trainer(cfg)
    try:
        metrics = trainer.run()
        tokens = torch.tensor([TOY_TOKENIZER.encode("123+456=", bos=True)])
        megatron = models.forward_logits(trainer.student[0].eval(), tokens)[..., :18].float()
        export_hf(trainer.student, hf, ws / "from-memory")
    finally:
        trainer.close()
    export_hf(ws / "run" / "ckpt", hf, ws / "trained")
    assert_same_weights(ws / "from-memory", ws / "trained")
    before, after = hf_weights(hf), hf_weights(ws / "trained")
    assert (ws / "trained" / "tokenizer_config.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(str(ws / "trained"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(tokens).logits.float()
        generated = model.generate(tokens, max_new_tokens=6, do_sample=False, pad_token_id=0)
    return {"loss": metrics.get("loss"), "tensors": len(before),
            "changed": sum(not torch.equal(before[n], after[n]) for n in before),
            "max_diff": float((theirs - megatron).abs().max()), "scale": float(megatron.abs().max()),
            "generated": generated[0, tokens.shape[1]:].tolist(),
            "architectures": json.loads((ws / "trained" / "config.json").read_text())["architectures"]}


# ---- two processes -----------------------------------------------------------------------------


def parallel(ctx):
    """The converted checkpoints loaded at TP=2, PP=2 and TP=1 (DP=2): logits against HF's, exports
    from the model chunks in memory (through the sharded path) bit-exact, the compare API."""
    from scope_megatron.convert import export_hf
    from scope_megatron.convert.compare import compare_hf_megatron, compare_logits, hf_logits, megatron_logits
    from scope_megatron.training import checkpoint, models, platform

    ws = workspace()
    hf, mg = ws / "hf", ws / "mg"
    platform.apply_cpu_shims()
    logits = {}

    def in_layout(tp, pp, fn):
        platform.initialize_parallel(tp, pp)
        platform.seed_everything(ctx.seed % 100000)
        try:
            fn()
        finally:
            platform.destroy_parallel()

    def logits_match(layout_name, names, ckpt_of=lambda n: n):
        for name in names:
            vocab = TINY[name][1]["vocab_size"]
            tokens = _tokens(vocab, ctx.seed)
            result = compare_logits(hf_logits(hf / name, tokens, vocab),
                                    megatron_logits(mg / ckpt_of(name), tokens))
            logits[f"{layout_name}/{ckpt_of(name)}"] = [result.max_abs_diff, result.top1_agreement]
            assert result.passed and result.top1_agreement == 1.0, (name, result.summary())

    def export_from_chunks(layout_name, names):
        for name in names:
            cfg = models.ModelConfig(**checkpoint.checkpoint_info(mg / name)["model_config"])
            chunks = models.build_model_chunks(cfg)
            checkpoint.load_checkpoint(mg / name, chunks)
            out = ws / f"chunks-{layout_name}" / name
            export_hf(chunks, hf / name, out)
            if dist.get_rank() == 0:
                assert_same_weights(hf / name, out)
                assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # shards removed
            dist.barrier()

    def named_tensors_match(names):
        """hf_named_tensors (the in-memory weight sync's source) yields exactly the HF weights on
        every rank of the model-parallel group."""
        from scope_megatron.convert import hf_named_tensors

        for name in names:
            cfg = models.ModelConfig(**checkpoint.checkpoint_info(mg / name)["model_config"])
            chunks = models.build_model_chunks(cfg)
            checkpoint.load_checkpoint(mg / name, chunks)
            want = hf_weights(hf / name)
            got = dict(hf_named_tensors(chunks, hf / name))
            assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
            for key, tensor in want.items():
                assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), (name, key)
            bf16 = dict(hf_named_tensors(chunks, hf / name, dtype="bfloat16"))
            assert all(t.dtype == torch.bfloat16 for t in bf16.values())

    def compare_api():
        good = compare_hf_megatron(hf / "qwen3_qknorm", mg / "qwen3_qknorm", _tokens(61, ctx.seed))
        assert good.passed and good.positions == 24 and good.vocab_size == 61, good.summary()
        other = compare_hf_megatron(hf / "qwen2_bias_sharded", mg / "llama_gqa_untied", _tokens(50, ctx.seed))
        assert not other.passed and other.max_abs_diff > other.tolerance, other.summary()
        _expect_error(lambda: compare_hf_megatron(hf / "qwen3_qknorm", mg / "qwen3_qknorm",
                                                  torch.tensor([[1, 61]])), "tokens must be")

    everything = list(TINY)
    checks = {
        "tp2_logits": lambda _: in_layout(2, 1, lambda: logits_match("tp2", everything)),
        "tp1_logits": lambda _: in_layout(1, 1, lambda: logits_match("tp1", everything)),
        "converted_at_tp2_loads_at_tp1": lambda _: in_layout(1, 1, lambda: logits_match(
            "tp1", ["llama_gqa_untied"], ckpt_of=lambda n: CONVERTED_TP2)),
        "tp2_export_bit_exact": lambda _: in_layout(2, 1, lambda: export_from_chunks(
            "tp2", ["qwen2_bias_sharded", "qwen3_qknorm"])),
        "pp2_export_bit_exact": lambda _: in_layout(1, 2, lambda: export_from_chunks(
            "pp2", ["llama_gqa_untied", "llama_tied"])),
        "compare_api_tp2": lambda _: in_layout(2, 1, compare_api),
        "tp2_named_tensors": lambda _: in_layout(2, 1, lambda: named_tensors_match(
            ["qwen2_bias_sharded", "llama_tied"])),
        "pp2_named_tensors": lambda _: in_layout(1, 2, lambda: named_tensors_match(
            ["qwen3_qknorm", "llama_tied"])),
    }
    return dict(run_timed(checks, ctx), logits=logits)
