"""Markdown / CSV / JSON writers and the macro average."""
import csv
import json

import pytest

from scope_megatron.eval import (format_markdown_table, macro_average, summarize, write_csv,
                                 write_json, write_report)

RESULTS = {
    "aime24": {"num_problems": 30, "num_samples": 4, "Avg@4": 0.425, "Pass@4": 0.75},
    "toy": {"num_problems": 2, "num_samples": 4, "Avg@4": 0.125, "Pass@4": 0.5, "best@4": 0.4},
}


def test_markdown_table():
    table = format_markdown_table(RESULTS)
    assert table.splitlines() == [
        "| benchmark | num_problems | num_samples | Avg@4 | Pass@4 | best@4 |",
        "|---|---:|---:|---:|---:|---:|",
        "| aime24 | 30 | 4 | 42.5 | 75.0 |  |",
        "| toy | 2 | 4 | 12.5 | 50.0 | 40.0 |",
    ]
    assert "0.425" in format_markdown_table(RESULTS, metrics=["Avg@4"], percent=False, decimals=3)


def test_macro_average():
    assert macro_average(RESULTS) == {"Avg@4": pytest.approx(0.275), "Pass@4": pytest.approx(0.625)}


def test_csv_json_round_trip(tmp_path):
    results = {"toy": summarize([[1, 0, 1, 1], [0, 0, 0, 1]], bootstrap=True), **RESULTS}
    paths = write_report(results, tmp_path / "out" / "eval")
    assert sorted(p.name for p in paths.values()) == ["eval.csv", "eval.json", "eval.md"]
    assert json.loads(paths["json"].read_text()) == results
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["benchmark"] for r in rows] == ["toy", "aime24"]
    assert float(rows[0]["Pass@4"]) == results["toy"]["Pass@4"]    # full precision
    assert rows[1]["best@4"] == ""
    write_csv(RESULTS, tmp_path / "only.csv", metrics=["Pass@4"])
    assert (tmp_path / "only.csv").read_text().splitlines()[0] == "benchmark,Pass@4"


def test_writers_refuse_bad_results(tmp_path):
    with pytest.raises(ValueError, match="no results"):
        format_markdown_table({})
    with pytest.raises(ValueError, match="toy/Avg@4 is nan"):
        write_json({"toy": {"Avg@4": float("nan")}}, tmp_path / "x.json")
