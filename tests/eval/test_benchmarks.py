"""Benchmark loaders on small files in each public layout (JSONL, JSON, Parquet)."""
import json

import pytest

from scope_megatron.eval.benchmarks import load_benchmark, load_benchmarks

LAYOUTS = {
    # file name: (rows as published, expected (id, problem, answer) of the first row)
    "aime24.jsonl": ([{"id": 60, "problem": "Every morning Aya walks", "solution": "...", "answer": "204",
                       "url": "u", "year": 2024}], ("60", "Every morning Aya walks", "204")),
    "AIME_2024.parquet": ([{"ID": "2024-I-1", "Problem": "Find x", "Solution": "...", "Answer": 204}],
                          ("2024-I-1", "Find x", "204")),
    "aime25.jsonl": ([{"question": "Find the sum", "answer": "70"}], ("0", "Find the sum", "70")),
    "amc23.parquet": ([{"id": 0, "question": "How many", "answer": 27.0, "url": "u"}], ("0", "How many", "27")),
    "math500.jsonl": ([{"problem": "Convert $(0,3)$", "solution": "\\boxed{(3, \\frac{\\pi}{2})}",
                        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
                        "unique_id": "test/precalculus/807.json"}],
                      ("test/precalculus/807.json", "Convert $(0,3)$", "\\left( 3, \\frac{\\pi}{2} \\right)")),
    "minerva_math.json": ({"data": [{"question": "Each of the two Magellan", "answer": "4.5e-11"}]},
                          ("0", "Each of the two Magellan", "4.5e-11")),
    "olympiadbench.parquet": ([{"id": 1606, "question": "Xenia and Sergey", "solution": ["..."],
                                "final_answer": ["$x=1$", "$x=-1$"], "is_multiple_answer": True}],
                              ("1606", "Xenia and Sergey", "$x=1$, $x=-1$")),
    # the SCOPE reference code's verl parquet layout
    "math500_verl.parquet": ([{"data_source": "math500", "prompt": [{"role": "system", "content": "s"},
                                                                   {"role": "user", "content": "What is 1+1?"}],
                               "reward_model": {"style": "rule", "ground_truth": "2"}, "extra_info": {"index": 7}}],
                             ("0", "What is 1+1?", "2")),
}


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


def test_jsonl_with_unescaped_line_separators(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 / U+2029 / U+0085 raw inside strings; they
    are not line breaks of the file."""
    rows = [{"problem": "Find x.\u2028 Given x\u2029+1 = 2\u0085.", "answer": "1"}, {"problem": "Q", "answer": "2"}]
    path = tmp_path / "aime24.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    problems = load_benchmark(path).problems
    assert [(p.problem, p.answer) for p in problems] == [(r["problem"], r["answer"]) for r in rows]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_layout(tmp_path, name):
    pytest.importorskip("pyarrow")
    rows, (pid, problem, answer) = LAYOUTS[name]
    _write(tmp_path / name, rows)
    bench = load_benchmark(tmp_path / name)
    first = bench.problems[0]
    assert (first.id, first.problem, first.answer) == (pid, problem, answer)


def test_names_and_directories(tmp_path):
    pytest.importorskip("pyarrow")
    for name in ("aime24.jsonl", "aime25.jsonl", "amc23.parquet", "math500.jsonl", "minerva_math.json",
                 "olympiadbench.parquet"):
        _write(tmp_path / name, LAYOUTS[name][0])
    benches = load_benchmarks([tmp_path])
    assert sorted(b.name for b in benches) == ["aime24", "aime25", "amc23", "math500", "minerva_math",
                                               "olympiadbench"]


def test_errors(tmp_path):
    bad = tmp_path / "aime24.jsonl"
    bad.write_text(json.dumps({"question": "no answer here"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 has no answer \(fields: \['question'\]\)"):
        load_benchmark(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_benchmark(bad)
    with pytest.raises(FileNotFoundError):
        load_benchmark(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported benchmark file type"):
        load_benchmark(tmp_path / "x.csv")
    (tmp_path / "a").mkdir()
    _write(tmp_path / "a" / "aime24.jsonl", LAYOUTS["aime24.jsonl"][0])
    _write(tmp_path / "a" / "aime_2024.jsonl", LAYOUTS["aime24.jsonl"][0])
    with pytest.raises(ValueError, match=r"map to the benchmark name\(s\) \['aime24'\]"):
        load_benchmarks([tmp_path / "a"])


def test_limit(tmp_path):
    path = tmp_path / "aime25.jsonl"
    _write(path, [{"question": f"q{i}", "answer": str(i)} for i in range(5)])
    assert [p.answer for p in load_benchmark(path, limit=2).problems] == ["0", "1"]
    assert len(load_benchmark(path).problems) == 5
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="limit must be an integer >= 1"):
            load_benchmark(path, limit=bad)
