"""fashionbert train: MLM + MPM + TIA (+ the contrastive itc task) pretraining on featurize output, with adaptive
task weights.

    python -m fashionbert.train --features DIR --out OUT [options]
    torchrun --nproc_per_node N -m fashionbert.train --features DIR --out OUT ...   (DDP; gloo on CPU, nccl on GPU)

Writes OUT/checkpoints/step-N/ (atomic; --resume continues from the newest complete one), OUT/model/ (the
final model for scoring), OUT/metrics.jsonl, OUT/training_curves.png and OUT/summary.json.

The loop is deliberately plain (nanoGPT style): set-up builds a state (state.py); then each step is batch ->
step (step.py) -> log (metrics.py) -> validate/checkpoint. Imports only torch, transformers, pyarrow, numpy and
tqdm (matplotlib lazily for the plot): a GPU box without apache_beam or faiss runs it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Callable

from fashionbert.errors import UserError
from fashionbert.evaluation.quick_validation import validate
from fashionbert.logs import setup_logging
from fashionbert.model.score_fusion import ScoreFusion
from fashionbert.runtime import Runtime, setup_runtime
from fashionbert.train import checkpoint as ckpt
from fashionbert.train.config import TrainConfig, add_arguments, config_from_args
from fashionbert.train.metrics import METRICS, TrainingLog
from fashionbert.train.state import Objective, TrainState, build_state
from fashionbert.train.step import MATCHING_TASKS, train_step

__all__ = ["TrainConfig", "add_arguments", "config_from_args", "main", "run", "train"]

SUMMARY = "summary.json"
logger = logging.getLogger(__name__)


def run(config: TrainConfig, on_step: Callable[[int], None] | None = None,
        objective: Objective = Objective()) -> dict[str, Any]:
    """Train; returns a summary with the final step, metrics and model folder ({} on processes other than the
    main one). `on_step(step)` is called after each completed step, once its checkpoint (if any) is on disk.
    `objective` says what the steps optimise where it is not pretraining (distillation: train/distill.py)."""
    t_start = time.time()
    rt = setup_runtime(config.device, config.precision, config.num_threads)
    try:
        state = build_state(config, rt, objective)
        _log_start(state, rt)
        log = TrainingLog(state.out, state.tasks, state.step, state.total_steps, state.resumed_from is not None,
                          rt.main, config.progress, t_start, state.objective.name)
        try:
            train(state, rt, log, on_step)
        finally:
            log.close_bar()
            state.close()
        summary = _finish(state, rt, log, t_start) if rt.main else {}
        rt.barrier()
        return summary
    finally:
        rt.close()


def train(state: TrainState, rt: Runtime, log: TrainingLog, on_step: Callable[[int], None] | None = None) -> None:
    """The loop, from `state.step` to `state.total_steps`."""
    config = state.config
    while state.step < state.total_steps:
        # forward/backward over the step's micro-batches, clip, optimizer step
        result = train_step(state, rt)
        log.train(state.step, state.position.epoch, result)
        # validate and checkpoint; the fusion fitted at a validation is saved with that step's checkpoint
        final = state.step == state.total_steps
        fusion = None
        if state.validation is not None and (_every(state.step, config.val_every) or final):
            fusion = validate_model(state, rt, log)
        if _every(state.step, config.checkpoint_every) or final:
            save_checkpoint(state, rt, log, fusion)
            log.plot()
        if on_step is not None:
            on_step(state.step)


def _every(step: int, period: int) -> bool:
    return bool(period) and step % period == 0


def validate_model(state: TrainState, rt: Runtime, log: TrainingLog, show: bool = True) -> ScoreFusion | None:
    """Quick sample-100 validation on the held-out products -> the score fusion fitted on it."""
    metrics, fusion = validate(state.model, state.validation, state.model_config, rt)
    log.validation(state.step, metrics, show)
    return fusion


def save_checkpoint(state: TrainState, rt: Runtime, log: TrainingLog, fusion: ScoreFusion | None = None) -> None:
    """OUT/checkpoints/step-N with every process's stream position (a collective: every process calls it)."""
    positions = rt.all_gather_ints(state.position.as_list())
    if rt.main:
        info = {"options": state.options, "positions": positions,
                "batches_per_rank": state.step * state.config.grad_accum,
                "metrics": {"train": log.last_train, "validation": log.last_val}}
        extra = {name: kept.state_dict() for name, kept in (("itc_queue", state.queue), ("mining_bank", state.bank))
                 if kept is not None} or None
        ckpt.save_checkpoint(state.out, state.step, state.model, state.tokenizer, state.optimizer, state.scheduler,
                             info, keep=state.config.keep_checkpoints, fusion=fusion, extra=extra)
    rt.barrier()


def _log_start(state: TrainState, rt: Runtime) -> None:
    if not rt.main:
        return
    config, data, tasks, name = state.config, state.data, state.tasks, state.objective.name
    matching = [t for t in tasks if t in MATCHING_TASKS]
    positives_per_step = config.batch_size * config.grad_accum * rt.world
    plan = (state.objective.describe(state) if state.objective.describe is not None else
            f"{'+'.join(matching)} alone on every step (--matching-only)" if state.tia_steps >= state.total_steps else
            f"{'+'.join(matching)} alone for {state.tia_steps} steps, then {'/'.join(tasks)} with task weights "
            f"{config.task_weights}")
    if state.itc_steps and state.objective.describe is None:
        plan = f"itc alone for the first {state.itc_steps} steps (--itc-warmup), then {plan}"
    _log(f"{name}: {len(data.train_rows)} images / {len(data.train_products)} products for training, "
         f"{len(data.val_rows)} images held out; {rt.world} process(es) on {rt.device} ({rt.precision}); steps "
         f"{state.step}->{state.total_steps}, {positives_per_step} positives x (1+{config.neg_ratio}) rows per step; "
         f"{plan}")
    if data.texts.variant_texts:
        _log(f"{name}: {data.texts.variant_texts} text variants (--text-variants) beside {len(data.texts)} products' "
             f"texts: a pair draws one of its product's texts per pass")
    if data.index.skipped_no_text:
        _log(f"{name}: {data.index.skipped_no_text} image rows skipped (their product has no text)")


def _finish(state: TrainState, rt: Runtime, log: TrainingLog, t_start: float) -> dict[str, Any]:
    """OUT/model from the final checkpoint, the curves and OUT/summary.json (main process)."""
    final_ckpt = ckpt.latest_checkpoint(state.out)
    model_dir = ckpt.export_model(final_ckpt, state.out / ckpt.MODEL_DIR)
    if not log.last_val and state.validation is not None:  # resumed at the end: report; the checkpoint keeps its own fusion
        validate_model(state, rt, log, show=False)
    log.close()
    plot = log.plot()
    summary = {
        "final_step": state.step, "total_steps": state.total_steps, "model_dir": str(model_dir),
        "checkpoint": str(final_ckpt), "metrics_path": str(state.out / METRICS),
        "curves_path": str(plot) if plot else None,
        "train": {k: v for k, v in log.last_train.items() if k != "kind"},
        "validation": {k: v for k, v in log.last_val.items() if k != "kind"},
        "resumed_from": str(state.resumed_from) if state.resumed_from else None,
        "device": str(rt.device), "precision": rt.precision, "world_size": rt.world,
        "train_images": int(len(state.data.train_rows)), "validation_images": int(len(state.data.val_rows)),
        "seconds": time.time() - t_start,
    }
    tmp = state.out / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, state.out / SUMMARY)
    _log(f"{state.objective.name}: done at step {state.step}; model in {model_dir}")
    return summary


def _log(msg: str) -> None:
    logger.info(msg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fashionbert train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    setup_logging()
    try:
        summary = run(config)
    except UserError as exc:
        print(f"fashionbert train: error: {exc}", file=sys.stderr)
        return 2
    if summary:
        print(json.dumps({k: summary[k] for k in ("final_step", "model_dir", "validation")}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
