"""Evaluation results as Markdown, CSV and JSON.

`results` maps a benchmark name to its summary (scope_megatron.eval.summarize), e.g.
{"toy-held-out": {"num_problems": 256, "num_samples": 8, "Avg@8": 0.58, "Pass@8": 0.93}}.
Columns are the union of the summaries' keys in first-seen order; a missing value is blank.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

Results = Mapping[str, Mapping[str, Union[int, float]]]


def _columns(results: Results, metrics: Optional[Sequence[str]]) -> list[str]:
    if not results:
        raise ValueError("no results to report")
    if metrics is not None:
        return list(metrics)
    cols: dict[str, None] = {}
    for summary in results.values():
        cols.update(dict.fromkeys(summary))
    return list(cols)


def macro_average(results: Results) -> dict[str, float]:
    """The mean over benchmarks of every float metric that all benchmarks report (counts such
    as num_problems, which are ints, are not averaged)."""
    if not results:
        raise ValueError("no results to average")
    shared = [key for key in _columns(results, None)
              if all(isinstance(s.get(key), float) for s in results.values())]
    return {key: sum(s[key] for s in results.values()) / len(results) for key in shared}


def format_markdown_table(results: Results, *, metrics: Optional[Sequence[str]] = None,
                          percent: bool = True, decimals: int = 1) -> str:
    """A Markdown table, one row per benchmark. Float metrics are shown in percent (42.7) when
    percent=True, ints (counts) as they are."""
    cols = _columns(results, metrics)

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value * 100 if percent else value:.{decimals}f}"
        return str(value)

    lines = ["| benchmark | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, summary in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(summary.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_csv(results: Results, path: Union[str, os.PathLike], *,
              metrics: Optional[Sequence[str]] = None) -> None:
    """CSV with a header `benchmark,<metrics...>` and full-precision values."""
    cols = _columns(results, metrics)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", *cols])
        for name, summary in results.items():
            writer.writerow([name, *(("" if summary.get(c) is None else repr(summary[c]))
                                     for c in cols)])


def write_json(results: Results, path: Union[str, os.PathLike]) -> None:
    """{benchmark: summary} as indented, standard JSON (a non-finite value is an error)."""
    for name, summary in results.items():
        for key, value in summary.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"result {name}/{key} is {value}; JSON cannot hold it")
    with open(path, "w") as f:
        json.dump({name: dict(summary) for name, summary in results.items()}, f, indent=2)
        f.write("\n")


def write_report(results: Results, stem: Union[str, os.PathLike], *,
                 metrics: Optional[Sequence[str]] = None) -> dict[str, Path]:
    """Write <stem>.md, <stem>.csv and <stem>.json (parent directories created); returns the
    paths by format."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {fmt: stem.with_name(stem.name + "." + fmt) for fmt in ("md", "csv", "json")}
    paths["md"].write_text(format_markdown_table(results, metrics=metrics))
    write_csv(results, paths["csv"], metrics=metrics)
    write_json(results, paths["json"])
    return paths
