"""What training reports about itself: OUT/metrics.jsonl (one record per step and per validation), the progress
(a bar on a terminal, a log line every 30 s otherwise), and OUT/training_curves.png drawn from the records. Only the
main process writes."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from fashionbert.logs import progress as show_progress
from fashionbert.train.step import StepResult

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CURVES = "training_curves.png"


class MetricsLog:
    """Append-only JSONL; on resume, records past the checkpoint's step (from the killed run) are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [l for l in path.read_text().splitlines() if l.strip() and _record_step(l) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(l + "\n" for l in kept))
            os.replace(tmp, path)
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self.file.write(json.dumps(record, sort_keys=True) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62


class TrainingLog:
    """A run's metrics.jsonl and progress; keeps the latest train and validation records, which checkpoints
    and the summary repeat."""

    def __init__(self, out: Path, tasks: list[str], start_step: int, total_steps: int, resumed: bool, main: bool,
                 progress: bool, t_start: float, name: str = "train"):
        self.out, self.tasks, self.main, self.t_start = out, list(tasks), main, t_start
        self.metrics = MetricsLog(out / METRICS, start_step if resumed else None, main)
        self.bar = show_progress(total_steps, name, "steps", bar=progress, enabled=main, initial=start_step)
        self.pairs_rate_ema: float | None = None
        self.last_train: dict[str, Any] = {}
        self.last_val: dict[str, Any] = {}

    def train(self, step: int, epoch: int, result: StepResult) -> None:
        rate = result.pairs / max(result.seconds, 1e-9)
        self.pairs_rate_ema = rate if self.pairs_rate_ema is None else 0.9 * self.pairs_rate_ema + 0.1 * rate
        loss = float((result.weights * result.losses.nan_to_num()).sum())
        record = {"kind": "train", "step": step, "epoch": epoch, "lr": result.lr, "loss": loss,
                  "grad_norm": result.grad_norm, "pairs": result.pairs, "pairs_per_s": rate,
                  "step_seconds": result.seconds, "time": time.time() - self.t_start}
        for i, t in enumerate(self.tasks):
            task_loss = float(result.losses[i])
            record[f"loss_{t}"] = None if math.isnan(task_loss) else task_loss
            record[f"w_{t}"] = float(result.weights[i])
            record[f"n_{t}"] = float(result.n[i])
        self.metrics.write(record)
        self.last_train = record
        self.bar.set_postfix_str(self._postfix(loss, result), refresh=False)
        self.bar.update(1)

    def _postfix(self, loss: float, result: StepResult) -> str:
        tasks = " ".join(f"{t} {float(result.losses[i]):.3f}" for i, t in enumerate(self.tasks)
                         if not math.isnan(float(result.losses[i])))
        weights = "/".join(f"{float(w):.2f}" for w in result.weights)
        return f"loss {loss:.3f} | {tasks} | w {weights} | {self.pairs_rate_ema:.1f} pairs/s"

    def validation(self, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        self.last_val = {"kind": "validation", "step": step, **metrics}
        self.metrics.write(self.last_val)
        if show:
            self.bar.write(validation_line(self.last_val))

    def plot(self) -> Path | None:
        """training_curves.png from the records so far (matplotlib is optional on a bare GPU box)."""
        if not self.main:
            return None
        try:
            return plot_curves(self.out / METRICS, self.out / CURVES)
        except ImportError as exc:
            logger.warning(f"train: no training_curves.png ({exc})")
            return None

    def close_bar(self) -> None:
        self.bar.close()

    def close(self) -> None:
        self.metrics.close()


def validation_line(val: dict) -> str:
    heads = f"TIA alone {val['rank1_t2i_tia']:.3f}" + (f", itc alone {val['rank1_t2i_itc']:.3f}"
                                                       if "rank1_t2i_itc" in val else "")
    if "rank1_t2i_itc_hub" in val:
        heads += f", hubness-corrected {val['rank1_t2i_itc_hub']:.3f}"
    return (f"step {val['step']}: validation Rank@1 t2i {val['rank1_t2i']:.3f} ({heads}), TIA acc "
            f"{val['tia_accuracy']:.3f}, AUC {val['tia_auc']:.3f}")


def plot_curves(metrics_path: Path, png_path: Path) -> Path | None:
    """Task weights, per-task losses and validation metrics over steps (matplotlib, Agg, imported here)."""
    records = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "validation"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train]
    tasks = [k[2:] for k in sorted(train[0]) if k.startswith("w_")]
    fig, axes = plt.subplots(1, 3 if val else 2, figsize=(15 if val else 10, 4))
    for t in tasks:
        axes[0].plot(steps, [r[f"w_{t}"] for r in train], label=t)
        axes[1].plot(steps, [float("nan") if r[f"loss_{t}"] is None else r[f"loss_{t}"] for r in train], label=t)
    axes[0].set(title="task weights", xlabel="step", ylabel="weight")
    axes[1].set(title="task losses", xlabel="step", ylabel="loss", yscale="log")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    if val:
        vs = [r["step"] for r in val]
        for key in ("rank1_t2i", "tia_accuracy", "tia_auc"):
            axes[2].plot(vs, [r.get(key, float("nan")) for r in val], marker="o", label=key)
        axes[2].set(title="validation (held-out products)", xlabel="step", ylim=(0, 1))
        axes[2].legend()
        axes[2].grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(".tmp-" + png_path.name)
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
