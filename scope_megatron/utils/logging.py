"""Run logging on rank 0: a progress bar, per-step metrics to JSONL and TensorBoard, curve plots.

No torch.distributed calls here: the caller says whether this process is rank 0 (is_rank0=...);
on other ranks every object is inert and touches no file.

  ProgressBar(total, is_rank0=...)            tqdm bar on a TTY, a plain line every print_every
                                              steps otherwise (cluster logs), nothing off rank 0
  MetricsLogger(log_dir, is_rank0=..., resume_step=...)   <log_dir>/metrics.jsonl (one JSON
                                              object per logged step, flushed per line) and
                                              <log_dir>/tensorboard/ (SummaryWriter)
  read_metrics(jsonl_path) -> list[dict]
  plot_curves(jsonl_path, png_path, keys) -> matplotlib Figure, one subplot per key, x = step

TensorBoard is required when MetricsLogger(tensorboard=True) (the default) and a missing
`tensorboard` package is an ImportError that names the fix; matplotlib is imported by
plot_curves only.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TextIO, Union

import torch
from tqdm import tqdm

PathLike = Union[str, os.PathLike]
RESERVED_KEYS = ("step", "wall_time")
TENSORBOARD_DIR = "tensorboard"  # MetricsLogger's TensorBoard events: <log_dir>/tensorboard/


def _format_value(value: Union[int, float]) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _format_rate(tokens_per_s: float) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if tokens_per_s >= scale:
            return f"{tokens_per_s / scale:.1f}{suffix}"
    return f"{tokens_per_s:.0f}"


class ProgressBar:
    """Training progress on rank 0.

    mode: "bar" (tqdm, when `file` is a TTY or force_tty=True), "lines" (one plain line every
    print_every steps, for logs redirected to files; print_every=0 prints nothing), "off" (not
    rank 0).
    update(step, tokens=None, **scalars): `step` is the number of steps done (initial..total);
    `tokens` the tokens processed since the previous update, shown as tok/s over the wall time
    since then; scalars (reward=, loss=, ...) are shown in the order passed.
    """

    def __init__(self, total: int, *, is_rank0: bool, desc: str = "train", initial: int = 0,
                 print_every: int = 10, file: Optional[TextIO] = None,
                 force_tty: Optional[bool] = None):
        self.file = sys.stderr if file is None else file
        self.total, self.desc, self.print_every = total, desc, print_every
        if force_tty is None:
            force_tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.mode = "off" if not is_rank0 else ("bar" if force_tty else "lines")
        self._bar = (tqdm(total=total, initial=initial, desc=desc, file=self.file,
                          dynamic_ncols=True) if self.mode == "bar" else None)
        self._last_time = time.perf_counter()

    def update(self, step: int, *, tokens: Optional[int] = None, **scalars: Any) -> None:
        if self.mode == "off":
            return
        now = time.perf_counter()
        shown = {key: _format_value(_scalar(key, value)) for key, value in scalars.items()}
        if tokens is not None:
            shown["tok/s"] = _format_rate(tokens / max(now - self._last_time, 1e-9))
        self._last_time = now
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.print_every and (step % self.print_every == 0 or step == self.total):
            fields = " | ".join(f"{key} {value}" for key, value in shown.items())
            print(f"{self.desc} step {step}/{self.total} | {fields}", file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scalar(key: str, value: Any) -> Union[int, float]:
    """A metric value as a Python int or float (bools -> 0/1, one-element tensors -> item)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {key!r} is a tensor of shape {tuple(value.shape)}; log a "
                            "scalar (reduce it first)")
        value = value.item()
    if isinstance(value, numbers.Integral):  # bools included
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric {key!r} has type {type(value).__name__}; log numbers only")


def read_metrics(jsonl_path: PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file. An unterminated last line (a writer killed mid-line,
    or one still writing) is skipped; any other malformed line raises ValueError."""
    path = Path(jsonl_path)
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    records = []
    for number, line in enumerate(complete.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not valid JSON ({e}); the metrics file is "
                             "corrupt") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}: line {number} is not a metrics record with an integer "
                             f"'step': {line[:200]!r}")
        records.append(record)
    return records


def _event_files(log_dir: Path) -> list[Path]:
    return sorted((log_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def _held(jsonl: Path, events: Sequence[Path]) -> Optional[str]:
    if jsonl.exists() and jsonl.stat().st_size > 0:
        return jsonl.name
    return "TensorBoard events" if events else None


def logged_metrics(log_dir: PathLike, filename: str = "metrics.jsonl") -> Optional[str]:
    """What in log_dir holds a run's metrics (a non-empty metrics file, else TensorBoard events),
    or None: what MetricsLogger refuses to start a new run over."""
    log_dir = Path(log_dir)
    return _held(log_dir / filename, _event_files(log_dir))


class MetricsLogger:
    """Per-step scalars to <log_dir>/metrics.jsonl and TensorBoard, on rank 0 only.

    Each log(step, metrics) appends one line {"step": step, "wall_time": unix seconds,
    **metrics} and flushes it; the same scalars go to TensorBoard under their keys. Several
    calls may log the same step (e.g. training metrics, then evaluation); steps never decrease.
    Non-finite values are written as JSON null (strict JSON) and as NaN/inf to TensorBoard.

    Starting:
      resume_step=None: a new run. An existing non-empty metrics file or TensorBoard events in
        log_dir are an error (FileExistsError) unless overwrite=True, which deletes them.
      resume_step=s: continue a run whose checkpoint holds steps <= s. Records with step > s
        (logged after that checkpoint) are removed from the JSONL file (rewritten atomically),
        TensorBoard purges its events after s, and new steps must be > s. A missing file is fine.
    tensorboard=False writes the JSONL file only.
    """

    def __init__(self, log_dir: PathLike, *, is_rank0: bool, resume_step: Optional[int] = None,
                 overwrite: bool = False, tensorboard: bool = True,
                 filename: str = "metrics.jsonl"):
        self.is_rank0 = is_rank0
        self.log_dir = Path(log_dir)
        self.jsonl_path = self.log_dir / filename
        self.tensorboard_dir = self.log_dir / TENSORBOARD_DIR
        self._file = None
        self._writer = None
        self._min_step = 0 if resume_step is None else resume_step + 1
        self._last_step: Optional[int] = None
        if not is_rank0:
            return
        if resume_step is not None and (not isinstance(resume_step, int) or resume_step < 0):
            raise ValueError(f"MetricsLogger: resume_step must be a step >= 0, got {resume_step!r}")
        summary_writer = _summary_writer_class() if tensorboard else None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        events = _event_files(self.log_dir)
        if resume_step is None:
            held = _held(self.jsonl_path, events)
            if held and not overwrite:
                raise FileExistsError(
                    f"MetricsLogger: {self.log_dir} already holds the metrics of a run "
                    f"({held}). Pass "
                    "resume_step=<checkpoint step> to continue it, overwrite=True to replace it, "
                    "or choose another log directory.")
            self.jsonl_path.unlink(missing_ok=True)
            for event_file in events:
                event_file.unlink()
        elif self.jsonl_path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.jsonl_path, "a")
        if summary_writer is not None:
            self._writer = summary_writer(
                log_dir=str(self.tensorboard_dir),
                purge_step=None if resume_step is None else resume_step + 1)

    def _truncate_after(self, resume_step: int) -> None:
        records = read_metrics(self.jsonl_path)
        kept = [r for r in records if r["step"] <= resume_step]
        tmp = self.jsonl_path.with_name(self.jsonl_path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.jsonl_path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.is_rank0:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log after close()")
        if isinstance(step, bool) or not isinstance(step, int) or step < self._min_step:
            raise ValueError(f"MetricsLogger.log: step must be an integer >= {self._min_step} "
                             f"(resumed runs log steps after the resume step), got {step!r}")
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"MetricsLogger.log: step {step} is before the last logged step "
                             f"{self._last_step}; steps must not decrease")
        clash = [key for key in metrics if key in RESERVED_KEYS]
        if clash:
            raise ValueError(f"MetricsLogger.log: metric names {clash} are reserved "
                             f"{RESERVED_KEYS}; rename them")
        values = {key: _scalar(key, value) for key, value in metrics.items()}
        record = {"step": step, "wall_time": round(time.time(), 3)}
        record.update({key: v if math.isfinite(v) else None for key, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()
        self._last_step = step

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("MetricsLogger(tensorboard=True) needs the `tensorboard` package: "
                          "pip install tensorboard, or pass tensorboard=False to write the JSONL "
                          f"file only ({e})") from e
    return SummaryWriter


def plot_curves(jsonl_path: PathLike, png_path: PathLike, keys: Optional[Sequence[str]] = None,
                *, title: Optional[str] = None):
    """Plot metrics over steps from a metrics JSONL file into a PNG (matplotlib, Agg canvas; no
    pyplot state is touched). Returns the matplotlib Figure.

    keys: one subplot per key, in order (default: every numeric key in the file, first-seen
      order, except step and wall_time). Each subplot uses the records that hold the key (keys
      logged at different steps, e.g. evaluation every N steps, each get their own x values);
      null values are skipped; a key with no values gets an empty subplot marked "not logged".
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plot_curves needs matplotlib: pip install matplotlib ({e})") from e
    records = read_metrics(jsonl_path)
    if keys is None:
        found: dict[str, None] = {}
        for r in records:
            found.update(dict.fromkeys(k for k, v in r.items() if k not in RESERVED_KEYS
                                       and isinstance(v, (int, float)) and not isinstance(v, bool)))
        keys = list(found)
    if not keys:
        raise ValueError(f"plot_curves: {jsonl_path} holds no metrics to plot")
    ncols = 1 if len(keys) == 1 else 2
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(6 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[len(keys):]:
        fig.delaxes(ax)
    steps = [r["step"] for r in records]
    for ax, key in zip(axes, keys):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(points) <= 30 else None, markersize=3)
        if max(steps) > min(steps):  # one step range for all subplots, sparse keys included
            ax.set_xlim(min(steps), max(steps))
    if title:
        fig.suptitle(title)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return fig
