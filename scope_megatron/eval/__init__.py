"""Evaluation metrics (Avg@k, Pass@k, the reference code's bootstrap best@k) and result writers.

  pass_at_k(n, c, k)                              unbiased estimator of one problem
  avg_at_k(correct), avg_at_k_per_problem         mean accuracy of a [P, n] grade grid
  pass_at_k_per_problem(correct, k)               [P] unbiased Pass@k
  bootstrap_best_at_k_per_problem(correct, k, n_bootstrap=1000, seed=42)
  summarize(correct, ks=None, bootstrap=False) -> {"Avg@n", "Pass@k", ["best@k"], counts}
  macro_average, format_markdown_table, write_csv, write_json, write_report
"""
from .metrics import (as_grades, avg_at_k, avg_at_k_per_problem, bootstrap_best_at_k_per_problem,
                      default_ks, pass_at_k, pass_at_k_per_problem, summarize)
from .report import format_markdown_table, macro_average, write_csv, write_json, write_report

__all__ = [
    "pass_at_k", "as_grades", "avg_at_k", "avg_at_k_per_problem", "pass_at_k_per_problem",
    "bootstrap_best_at_k_per_problem", "default_ks", "summarize",
    "macro_average", "format_markdown_table", "write_csv", "write_json", "write_report",
]
