"""tools/evaluate.py as a user runs it (separate processes): the toy world's held-out split from a
checkpoint at TP=1 and TP=2, a Hugging Face model (the toy teacher exported with the toy
template) on benchmark files in the public layouts, and refusals with exit status 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEACHER, STUDENT = REPO / "checkpoints/toy/teacher", REPO / "checkpoints/toy/student"


def _run(*args, nproc=1, timeout=300):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(launcher + [str(REPO / "tools/evaluate.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _report(stem: Path) -> dict:
    return json.loads(stem.with_name(stem.name + ".json").read_text())


def _benchmark_row(results, name):
    return results[name]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_toy")
    runs = {}
    for name, ckpt, nproc, extra in (("teacher", TEACHER, 1, []), ("student", STUDENT, 1, []),
                                     ("student_tp2", STUDENT, 2, ["--tp", "2"])):
        r = _run("--megatron-dir", ckpt, "--toy", "--toy-problems", 48, "--k", 4, "--seed", 3,
                 "--out", out / name, *extra, nproc=nproc)
        assert r.returncode == 0, r.stdout + r.stderr
        runs[name] = (out / name, r.stdout)
    return runs


def test_toy_teacher_solves_the_held_out_split(toy_runs):
    stem, stdout = toy_runs["teacher"]
    row = _benchmark_row(_report(stem), "toy_heldout")
    assert row["num_problems"] == 48 and row["num_samples"] == 4
    assert row["Avg@4"] >= 0.95 and row["Pass@4"] >= row["Avg@4"]
    assert "toy_heldout: Avg@4" in stdout
    per_problem = [json.loads(line) for line in stem.with_name(stem.name + ".per_problem.jsonl").open()]
    assert len(per_problem) == 48 and all(0 <= p["correct"] <= 4 for p in per_problem)
    assert sum(p["correct"] for p in per_problem) / (48 * 4) == pytest.approx(row["Avg@4"])


def test_toy_student_is_weaker_and_tp2_samples_the_same(toy_runs):
    one = _benchmark_row(_report(toy_runs["student"][0]), "toy_heldout")
    two = _benchmark_row(_report(toy_runs["student_tp2"][0]), "toy_heldout")
    assert one["Avg@4"] < 0.9  # the untrained student: the metric is not saturated
    # TP changes no sampling stream (one data-parallel replica): the same samples, the same grades
    assert two["Avg@4"] == pytest.approx(one["Avg@4"]) and two["Pass@4"] == pytest.approx(one["Pass@4"])


def _write_layouts(directory: Path, problems):
    """The toy problems in the six public benchmark layouts and verl's (JSONL, JSON, Parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def jsonl(name, rows):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def parquet(name, rows):
        pq.write_table(pa.Table.from_pylist(rows), directory / name)

    directory.mkdir()
    jsonl("aime24.jsonl", [{"id": 60 + i, "problem": q, "solution": "...", "answer": a}
                           for i, (q, a) in enumerate(problems)])
    jsonl("aime25.jsonl", [{"question": q, "answer": a} for q, a in problems])
    parquet("amc23.parquet", [{"id": i, "question": q, "answer": float(a)} for i, (q, a) in enumerate(problems)])
    jsonl("math500.jsonl", [{"unique_id": f"test/algebra/{i}.json", "problem": q, "solution": "...",
                             "answer": a, "level": 1} for i, (q, a) in enumerate(problems)])
    (directory / "minerva_math.json").write_text(json.dumps({"data": [{"question": q, "answer": a}
                                                                      for q, a in problems]}))
    parquet("olympiadbench.parquet", [{"id": i, "question": q, "final_answer": [a]}
                                      for i, (q, a) in enumerate(problems)])
    parquet("verl_style.parquet", [{"prompt": [{"role": "user", "content": q}],
                                    "reward_model": {"style": "rule", "ground_truth": a}} for q, a in problems])


NAMES = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench", "verl_style")


@pytest.fixture(scope="module")
def teacher_hf(tmp_path_factory):
    """The toy teacher exported as an HF model, and its held-out problems in every layout."""
    from scope_megatron.convert import export_hf, write_toy_template
    from scope_megatron.data.toy_arithmetic import ToyArithmetic
    from scope_megatron.training.checkpoint import checkpoint_info

    root = tmp_path_factory.mktemp("eval_hf")
    world = ToyArithmetic()
    template = write_toy_template(checkpoint_info(TEACHER)["model_config"], root / "template")
    export_hf(TEACHER, template, root / "hf")
    _write_layouts(root / "bench", [(world.prompt_text(p), world.answer(p)) for p in world.held_out[:10]])
    return root / "hf", root / "bench", world


def test_hf_model_on_benchmark_files(tmp_path, teacher_hf):
    hf, bench, world = teacher_hf
    stem = tmp_path / "out" / "teacher_hf"
    r = _run("--hf-dir", hf, "--benchmarks", bench, "--prompt-template", "{problem}",
             "--no-chat-template", "--max-new-tokens", world.max_response_len, "--k", 2, "--out", stem)
    assert r.returncode == 0, r.stdout + r.stderr
    report = _report(stem)
    assert sorted(report) == sorted(NAMES + ("macro_average",))
    for name in NAMES:
        row = _benchmark_row(report, name)
        assert row["num_problems"] == 10 and row["Avg@2"] >= 0.9, (name, row)
    assert "macro average: Avg@2" in r.stdout
    macro = _benchmark_row(report, "macro_average")["Avg@2"]
    assert macro == pytest.approx(sum(report[n]["Avg@2"] for n in report if n != "macro_average") / len(NAMES))
    settings = json.loads(stem.with_name("teacher_hf.settings.json").read_text())
    assert settings["k"] == 2 and settings["max_new_tokens"] == world.max_response_len
    assert settings["chat_template"] is False and settings["model"] == str(hf)
    assert stem.with_name("teacher_hf.md").is_file() and stem.with_name("teacher_hf.csv").is_file()
    ids = {json.loads(line)["id"] for line in stem.with_name("teacher_hf.per_problem.jsonl").open()
           if '"aime24"' in line}
    assert ids == {str(60 + i) for i in range(10)}  # per-problem rows keep the file's ids

    # prompt (9 tokens) + response budget beyond the 64 positions: refused before sampling
    r = _run("--hf-dir", hf, "--benchmarks", bench / "aime24.jsonl",
             "--prompt-template", "{problem}", "--no-chat-template", "--max-new-tokens", 60,
             "--out", tmp_path / "out" / "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "exceeds the model's max_position_embeddings 64: lower --max-new-tokens to at most 55" in r.stderr


def test_sglang_servers_sample_the_evaluation(tmp_path, teacher_hf):
    """--sglang-urls: the same files graded from a running server (the protocol-faithful test
    server holding the exported teacher), no model loaded in the tool."""
    import socket
    import time

    import requests

    hf, bench, world = teacher_hf
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tests.rollout.fake_sglang_server", "--model-path", str(hf),
                               "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.time() < deadline, "test server did not come up"
            time.sleep(0.5)
        stem = tmp_path / "sglang"
        r = _run("--sglang-urls", f"http://127.0.0.1:{port}", "--tokenizer", hf, "--benchmarks",
                 bench / "aime24.jsonl", bench / "amc23.parquet", "--prompt-template", "{problem}",
                 "--no-chat-template", "--max-new-tokens", world.max_response_len, "--k", 2, "--out", stem)
        assert r.returncode == 0, r.stdout + r.stderr
        report = _report(stem)
        assert sorted(report) == ["aime24", "amc23", "macro_average"]
        assert all(report[n]["Avg@2"] >= 0.9 and report[n]["num_problems"] == 10 for n in ("aime24", "amc23"))
        # a dead server: the error names it, exit status 2
        r = _run("--sglang-urls", "http://127.0.0.1:9", "--tokenizer", hf, "--benchmarks", bench / "aime24.jsonl",
                 "--prompt-template", "{problem}", "--no-chat-template", "--max-new-tokens", 8, "--k", 1,
                 "--out", tmp_path / "dead")
        assert r.returncode == 2 and "http://127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("args,message", [
    (["--megatron-dir", TEACHER, "--benchmarks", "x.jsonl"], "give --tokenizer (or --hf-dir): the prompts are built"),
    (["--megatron-dir", TEACHER, "--toy", "--k", "4", "--pass-ks", "8"], "--pass-ks [8] must lie in [1, --k=4]"),
    (["--megatron-dir", "/nonexistent/ckpt", "--toy"], "/nonexistent/ckpt does not exist"),
    (["--megatron-dir", TEACHER, "--tokenizer", REPO, "--benchmarks", "/nonexistent/b.jsonl"],
     "/nonexistent/b.jsonl"),
    (["--megatron-dir", TEACHER, "--toy", "--reward-fn", "nosuchmod:fn"], "module 'nosuchmod' not found"),
    (["--megatron-dir", TEACHER, "--toy", "--reward-fn", "scope_megatron.rewards.verifier:nosuch"],
     "has no attribute 'nosuch'"),
    (["--megatron-dir", TEACHER, "--toy", "--toy-problems", "0"], "--toy-problems must be at least 1"),
    (["--megatron-dir", TEACHER, "--tokenizer", REPO, "--benchmarks", "b.jsonl", "--limit", "0"],
     "limit must be an integer >= 1"),
])
def test_bad_input_is_refused_with_exit_status_2(tmp_path, args, message):
    r = _run(*args, "--out", tmp_path / "x")
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())
