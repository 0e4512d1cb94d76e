"""Rank-0 run logging: progress bar modes, metrics JSONL + TensorBoard, resume, curve plots."""
import io
import json
import sys

import pytest
import torch

from scope_megatron.utils.logging import MetricsLogger, ProgressBar, plot_curves, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def steps(path):
    return [r["step"] for r in lines(path)]


# ---- progress bar -------------------------------------------------------------------------------

def test_progress_bar_modes():
    off = io.StringIO()
    with ProgressBar(10, is_rank0=False, file=off, force_tty=True) as bar:
        bar.update(1, tokens=100, reward=0.5)
    assert bar.mode == "off" and off.getvalue() == ""

    tty = io.StringIO()
    with ProgressBar(10, is_rank0=True, file=tty, force_tty=True) as bar:
        for step in range(1, 11):
            bar.update(step, tokens=2048, reward=torch.tensor(0.5), loss=0.125, lr=3e-4)
    assert bar.mode == "bar"
    shown = tty.getvalue()
    assert "10/10" in shown and "reward=0.5" in shown and "loss=0.125" in shown
    assert "lr=0.0003" in shown and "tok/s=" in shown

    log = io.StringIO()   # not a TTY: plain lines every print_every steps
    with ProgressBar(10, is_rank0=True, file=log, print_every=5) as bar:
        for step in range(1, 11):
            bar.update(step, tokens=100, reward=0.25)
    assert bar.mode == "lines"
    printed = log.getvalue().splitlines()
    assert len(printed) == 2 and printed[0].startswith("train step 5/10 | reward 0.25 | tok/s ")


# ---- metrics logger -----------------------------------------------------------------------------

def test_jsonl_records_are_flushed_per_line(tmp_path, gen):
    values = torch.rand(5, generator=gen).tolist()
    logger = MetricsLogger(tmp_path, is_rank0=True, tensorboard=False)
    for step, v in enumerate(values, 1):
        logger.log(step, {"reward": v, "tokens": 128, "loss": torch.tensor(v * 2),
                          "all_correct": True})
        assert len(lines(logger.jsonl_path)) == step          # readable before close
    logger.log(5, {"eval/Avg@8": 0.5, "kl": float("nan")})   # a second record at the same step
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5]
    assert records[0]["reward"] == values[0] and records[0]["tokens"] == 128
    assert records[0]["loss"] == pytest.approx(values[0] * 2) and records[0]["all_correct"] == 1
    assert records[5]["eval/Avg@8"] == 0.5 and records[5]["kl"] is None
    assert all("wall_time" in r for r in records)
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()    # strict JSON


def test_non_rank0_touches_nothing(tmp_path):
    with MetricsLogger(tmp_path / "run", is_rank0=False) as logger:
        logger.log(1, {"reward": 1.0})
    assert not (tmp_path / "run").exists()


def test_resume_truncates_later_steps_and_continues(tmp_path):
    with MetricsLogger(tmp_path, is_rank0=True, tensorboard=False) as logger:
        for step in range(1, 11):
            logger.log(step, {"reward": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "rew')                          # killed mid-line
    with MetricsLogger(tmp_path, is_rank0=True, resume_step=6, tensorboard=False) as logger:
        assert steps(logger.jsonl_path) == [1, 2, 3, 4, 5, 6]
        with pytest.raises(ValueError, match="after the resume step"):
            logger.log(6, {"reward": 0.0})
        logger.log(7, {"reward": 0.7})
        logger.log(8, {"reward": 0.8})
        with pytest.raises(ValueError, match="must not decrease"):
            logger.log(7, {"reward": 0.0})
    assert steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6, 7, 8]


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    with MetricsLogger(tmp_path, is_rank0=True, tensorboard=False) as logger:
        logger.log(1, {"reward": 1.0})
    with pytest.raises(FileExistsError, match="resume_step"):
        MetricsLogger(tmp_path, is_rank0=True, tensorboard=False)
    with MetricsLogger(tmp_path, is_rank0=True, overwrite=True, tensorboard=False) as logger:
        logger.log(3, {"reward": 0.5})
    assert steps(tmp_path / "metrics.jsonl") == [3]


def test_bad_metrics_are_refused(tmp_path):
    with MetricsLogger(tmp_path, is_rank0=True, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="tensor of shape"):
            logger.log(1, {"loss": torch.ones(2)})
        with pytest.raises(TypeError, match="numbers only"):
            logger.log(1, {"note": "hi"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 3})
        with pytest.raises(ValueError, match="integer"):
            logger.log(1.0, {"loss": 1.0})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_tensorboard_events_are_written_and_purged_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, is_rank0=True) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward": step / 10, "eval/Pass@8": 0.5})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with MetricsLogger(tmp_path, is_rank0=True, resume_step=3) as logger:
        logger.log(4, {"reward": 0.9})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"reward", "eval/Pass@8"} <= set(events.Tags()["scalars"])
    reward = [(e.step, round(e.value, 6)) for e in events.Scalars("reward")]
    assert reward == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.9)]


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard.*tensorboard=False"):
        MetricsLogger(tmp_path, is_rank0=True)
    assert not (tmp_path / "metrics.jsonl").exists()


# ---- plots --------------------------------------------------------------------------------------

def test_plot_curves(tmp_path):
    with MetricsLogger(tmp_path, is_rank0=True, tensorboard=False) as logger:
        for step in range(1, 21):
            logger.log(step, {"reward": step / 20, "loss": 1 / step})
            if step % 5 == 0:
                logger.log(step, {"eval/Avg@8": step / 40, "eval/Pass@8": step / 25})
    keys = ["reward", "eval/Avg@8", "eval/Pass@8", "kl"]
    fig = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "curves.png", keys)
    assert (tmp_path / "plots" / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert len(fig.axes) == 4 and [ax.get_title() for ax in fig.axes] == keys
    reward_line, = fig.axes[0].get_lines()
    assert list(reward_line.get_xdata()) == list(range(1, 21))
    avg_line, = fig.axes[1].get_lines()
    assert list(avg_line.get_xdata()) == [5, 10, 15, 20]
    assert list(avg_line.get_ydata()) == [0.125, 0.25, 0.375, 0.5]
    assert fig.axes[1].get_xlim() == (1.0, 20.0)            # shared step range
    assert not fig.axes[3].get_lines()
    assert [t.get_text() for t in fig.axes[3].texts] == ["not logged"]

    fig = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "all.png")   # every logged key
    assert [ax.get_title() for ax in fig.axes] == ["reward", "loss", "eval/Avg@8", "eval/Pass@8"]
    assert (tmp_path / "all.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_of_an_empty_log_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1, "wall_time": 0.0}\n')
    with pytest.raises(ValueError, match="no metrics"):
        plot_curves(tmp_path / "m.jsonl", tmp_path / "m.png")


def test_tensorboard_events_alone_are_a_run(tmp_path):
    from scope_megatron.utils.logging import TENSORBOARD_DIR, logged_metrics

    assert logged_metrics(tmp_path) is None
    (tmp_path / TENSORBOARD_DIR).mkdir()
    (tmp_path / TENSORBOARD_DIR / "events.out.tfevents.1.host").write_bytes(b"x")
    (tmp_path / "metrics.jsonl").write_text("")  # empty: not a run
    assert logged_metrics(tmp_path) == "TensorBoard events"
    with pytest.raises(FileExistsError, match="TensorBoard events"):
        MetricsLogger(tmp_path, is_rank0=True, tensorboard=False)
    with MetricsLogger(tmp_path, is_rank0=True, overwrite=True, tensorboard=False):
        pass
    assert logged_metrics(tmp_path) is None  # overwrite removed the events
