"""Loaders for the math benchmarks of the SCOPE paper's evaluation, in their usual public file
layouts: AIME24, AIME25, AMC23, MATH500, Minerva Math and OlympiadBench, as JSONL, JSON or
Parquet.

Each file becomes a Benchmark: a name and a list of Problems (id, problem text, reference answer,
the remaining fields as metadata). Field names differ between publishers of the same benchmark;
the loader looks, in order, for:

  problem text  problem, Problem, question, Question, prompt (a string, or verl's chat list:
                the last user message), input
  answer        answer, Answer, final_answer (OlympiadBench: a list, joined with ", "),
                reward_model.ground_truth (verl / the SCOPE reference code's parquet files),
                ground_truth, target, expected_answer
  id            id, ID, unique_id, idx, problem_id, uid (else the row number)
Numeric answers stored as integral floats (27.0) become integers ("27").

For example: AIME24 (HuggingFaceH4/aime_2024: id, problem, answer; Maxwell-Jia/AIME_2024: ID,
Problem, Answer), AIME25 (opencompass/AIME2025: question, answer), AMC23 (math-ai/amc23: id,
question, answer), MATH500 (HuggingFaceH4/MATH-500: unique_id, problem, solution, answer),
Minerva Math (math-ai/minervamath: question, answer), OlympiadBench (Hothan/OlympiadBench: id,
question, final_answer). A row without a problem text or an answer is an error naming the file,
the row and the fields it has.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

KNOWN_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench")

PROBLEM_FIELDS = ("problem", "Problem", "question", "Question", "prompt", "input")
ANSWER_FIELDS = ("answer", "Answer", "final_answer", "reward_model.ground_truth", "ground_truth",
                 "target", "expected_answer")
ID_FIELDS = ("id", "ID", "unique_id", "idx", "problem_id", "uid")

# file-name hints -> canonical benchmark name
_NAME_HINTS = (("aime24", "aime24"), ("aime_2024", "aime24"), ("aime2024", "aime24"),
               ("aime25", "aime25"), ("aime_2025", "aime25"), ("aime2025", "aime25"),
               ("amc23", "amc23"), ("amc", "amc23"), ("math500", "math500"), ("math-500", "math500"),
               ("math_500", "math500"), ("minerva", "minerva_math"), ("olympiad", "olympiadbench"))


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    name: str
    problems: List[Problem]
    path: str

    def __len__(self) -> int:
        return len(self.problems)


def benchmark_name(path: Path) -> str:
    """The canonical benchmark name a file name suggests (else the file's stem)."""
    stem = path.name.lower()
    for hint, name in _NAME_HINTS:
        if hint in stem:
            return name
    return path.stem


def _rows(path: Path) -> List[Dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        # split at "\n" only: str.splitlines() also splits at U+2028 / U+2029 / U+0085, which
        # json.dumps(ensure_ascii=False) writes unescaped inside strings
        for i, line in enumerate(path.read_text().split("\n")):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc})") from exc
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):  # {"data": [...]} / {"test": [...]} layouts
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: a JSON object must hold exactly one list of problems")
            data = lists[0]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of problems")
        return data
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow "
                              "(or pip install -e .[eval])") from exc
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported benchmark file type {suffix!r}; use .jsonl, .json or .parquet")


def _lookup(row: Dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _text(value: Any) -> Optional[str]:
    """A problem text from a string or a chat message list (the last user message)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else None
    return None


def _answer(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [_answer(v) for v in value]
        parts = [p for p in parts if p]
        return ", ".join(parts) if parts else None
    if isinstance(value, float) and value.is_integer():  # AMC23 files store 27.0 for 27
        value = int(value)
    text = str(value).strip()
    return text or None


def load_benchmark(path, name: Optional[str] = None, limit: Optional[int] = None) -> Benchmark:
    """Reads one benchmark file (see the module docstring for the accepted layouts); limit: at
    most that many problems (>= 1), the first ones in the file."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"load_benchmark: limit must be an integer >= 1 (or None for every problem), got {limit!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    problems = []
    for i, row in enumerate(_rows(path)):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is not an object")
        text = next((t for t in (_text(_lookup(row, f)) for f in PROBLEM_FIELDS) if t), None)
        answer = next((a for a in (_answer(_lookup(row, f)) for f in ANSWER_FIELDS) if a), None)
        if text is None or answer is None:
            missing = "problem text" if text is None else "answer"
            raise ValueError(f"{path}: row {i} has no {missing} (fields: {sorted(row)}); expected one of "
                             f"{PROBLEM_FIELDS if text is None else ANSWER_FIELDS}")
        pid = next((str(row[f]) for f in ID_FIELDS if row.get(f) is not None), str(i))
        used = set(PROBLEM_FIELDS) | set(ANSWER_FIELDS) | set(ID_FIELDS)
        problems.append(Problem(pid, text, answer, {k: v for k, v in row.items() if k not in used}))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return Benchmark(name or benchmark_name(path), problems, str(path))


def load_benchmarks(paths: Sequence, limit: Optional[int] = None) -> List[Benchmark]:
    """Several files; names must be distinct (a directory is read as all its benchmark files)."""
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in (".jsonl", ".json", ".parquet"))
        else:
            files.append(p)
    benchmarks = [load_benchmark(f, limit=limit) for f in files]
    names = [b.name for b in benchmarks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several files map to the benchmark name(s) {duplicates}; rename them")
    return benchmarks
