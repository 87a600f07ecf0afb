"""fashionbert train: MLM + MPM + TIA (+ the contrastive itc task) pretraining on featurize output, with adaptive
task weights.

    python -m fashionbert.train --features DIR --out OUT [options]
    torchrun --nproc_per_node N -m fashionbert.train --features DIR --out OUT ...   (DDP; gloo on CPU, nccl on GPU)

Writes OUT/checkpoints/step-N/ (atomic; --resume continues from the newest complete one), OUT/model/ (the
final model for scoring), OUT/metrics.jsonl, OUT/training_curves.png and OUT/summary.json.

The loop is deliberately plain (nanoGPT style): build data, model, optimizer; then for each step, gradient
accumulation over micro-batches, clip, step, log, validate, checkpoint. Imports only torch, transformers,
pyarrow, numpy and tqdm (matplotlib lazily for the plot): a GPU box without apache_beam or faiss runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashionbert.data.batching import (BatchSettings, ImageStream, MaskingVocab, PairBuilder, Prefetcher,
                                       StreamPosition, iter_batches)
from fashionbert.data.features import FeatureReader, index_images, load_texts, open_feature_folders, validation_mask
from fashionbert.errors import UserError
from fashionbert.evaluation.quick_validation import validate
from fashionbert.evaluation.sample_hundred import build_sample_hundred
from fashionbert.model.backbone import load_tokenizer
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.modeling import FashionBertModel
from fashionbert.runtime import Runtime, setup_runtime
from fashionbert.train import checkpoint as ckpt
from fashionbert.train.adaptive_loss import TaskWeighter
from fashionbert.train.config import TrainConfig, add_arguments, config_from_args

# The tasks that match text to image; the warm-up trains these alone.
MATCHING_TASKS = ("tia", "itc")
METRICS = "metrics.jsonl"
CURVES = "training_curves.png"
SUMMARY = "summary.json"
# Options that fix the data order or the optimisation: a resumed run must use the checkpoint's values,
# or it would not continue the same run.
RESUME_MUST_MATCH = ("batch_size", "itc_dim", "itc_pooling", "dropout", "tia_warmup", "grad_accum", "neg_ratio", "random_neg_fraction", "seed", "split_seed",
                     "val_fraction", "task_weights", "lr", "warmup", "weight_decay", "shuffle_window", "world_size")
# A test seam: the process SIGKILLs itself after this step (to test --resume against a real kill).
KILL_AT_STEP_ENV = "FASHIONBERT_TEST_KILL_AT_STEP"


# ============================================================================================ pieces
def lr_lambda(warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


# ============================================================================================ run
def _check_resume_options(saved: dict, current: dict, where: Path) -> None:
    diff = [f"--{k.replace('_', '-')} {current.get(k)!r} (checkpoint: {saved.get(k)!r})"
            for k in RESUME_MUST_MATCH if k in saved and saved.get(k) != current.get(k)]
    if sorted(map(str, saved.get("features", []))) != sorted(map(str, current.get("features", []))):
        diff.append(f"--features {current.get('features')} (checkpoint: {saved.get('features')})")
    if diff:
        raise UserError(f"--resume: options differ from the run in {where}: {'; '.join(diff)}; resume with the "
                        f"checkpoint's options or train into a new --out")


def run(args: TrainConfig) -> dict[str, Any]:
    """Train; returns a summary with the final step, metrics and model folder."""
    t_start = time.time()
    rt = setup_runtime(args.device, args.precision, args.num_threads)
    try:
        return _run(args, rt, t_start)
    finally:
        rt.close()


def _run(args: TrainConfig, rt: Runtime, t_start: float) -> dict[str, Any]:
    out = Path(args.out).expanduser()
    if args.batch_size < 1 or args.grad_accum < 1 or args.neg_ratio < 0:
        raise UserError("--batch-size and --grad-accum must be >= 1, --neg-ratio >= 0")
    if not 0.0 <= args.random_neg_fraction <= 1.0:
        raise UserError("--random-neg-fraction must be in [0, 1]")
    existing = ckpt.latest_checkpoint(out)
    if existing is not None and not args.resume:
        raise UserError(f"--out {out} already has checkpoints (newest {existing.name}); pass --resume to continue "
                        f"that run, or choose a new --out")
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
    rt.barrier()

    # ---- data
    folders = open_feature_folders(args.features)
    texts = load_texts(folders)
    index = index_images(folders, texts)
    if not len(index):
        raise UserError(f"--features {', '.join(map(str, args.features))}: no image row has a product text; "
                        f"nothing to train on")
    grid, feature_dim = folders[0].grid, folders[0].feature_dim
    feat_opts = folders[0].options
    is_val_product = validation_mask(texts.group_id, args.val_fraction, args.split_seed)
    is_val_row = is_val_product[index.product]
    train_rows, val_rows = np.nonzero(~is_val_row)[0], np.nonzero(is_val_row)[0]
    if len(train_rows) < rt.world:
        raise UserError(f"only {len(train_rows)} training images after holding out --val-fraction "
                        f"{args.val_fraction}; lower it or featurize more products")

    # ---- model (from the checkpoint when resuming, else the pretrained backbone)
    resume_from = ckpt.latest_checkpoint(out) if args.resume else None
    options = {k: v for k, v in vars(args).items() if k not in ("func",)}
    options["features"] = [str(Path(f).expanduser().resolve()) for f in args.features]
    options["world_size"] = rt.world
    info: dict[str, Any] = {}
    train_state: dict[str, Any] = {}
    if resume_from is not None:
        info, train_state = ckpt.load_training_state(resume_from)
        _check_resume_options(info.get("options", {}), options, resume_from)
        model = FashionBertModel.from_checkpoint(resume_from)
        config = model.config
        tokenizer = load_tokenizer(resume_from)
    else:
        max_len = args.max_text_len or int(feat_opts.get("max_text_len") or 64)
        config = FashionBertConfig(
            backbone=str(args.backbone), max_text_len=max_len, grid=grid, feature_dim=feature_dim,
            cnn=str(feat_opts.get("cnn") or ""), patch_mode=str(feat_opts.get("patch_mode") or ""),
            mlm_probability=args.mlm_probability, mpm_probability=args.mpm_probability,
            whole_word_mask=args.whole_word_mask, dropout=None if args.dropout < 0 else args.dropout,
            itc_dim=args.itc_dim, itc_pooling=args.itc_pooling,
        )
        torch.manual_seed(args.seed)
        model = _quiet(lambda: FashionBertModel.from_pretrained_backbone(config))
        tokenizer = load_tokenizer(args.backbone)
    if (config.grid, config.feature_dim) != (grid, feature_dim):
        raise UserError(f"the checkpoint expects grid {config.grid} x feature_dim {config.feature_dim}, the features "
                        f"have {grid} x {feature_dim}")
    if texts.max_token_id() >= config.vocab_size:
        raise UserError(f"--features texts hold token id {texts.max_token_id()} >= the backbone's vocabulary "
                        f"({config.vocab_size}): they were tokenized for another backbone; featurize with the "
                        f"same --backbone as train")
    model.to(rt.device).train()

    # ---- batches
    settings = BatchSettings(
        batch_size=args.batch_size, max_text_len=config.max_text_len, pad_token_id=config.pad_token_id,
        sep_token_id=config.sep_token_id, mlm_probability=config.mlm_probability,
        mpm_probability=config.mpm_probability, whole_word_mask=config.whole_word_mask)
    vocab = MaskingVocab.from_tokenizer(tokenizer, config.vocab_size)
    reader = FeatureReader(index.shards, config.num_patches, config.feature_dim)
    stream = ImageStream(index, train_rows, reader, seed=args.seed, rank=rt.rank, world=rt.world,
                         window_rows=args.shuffle_window)
    train_products = np.unique(index.product[train_rows])
    pairs = PairBuilder(texts, train_products, args.neg_ratio, args.random_neg_fraction)
    positives_per_step = args.batch_size * args.grad_accum * rt.world
    if args.steps is not None:
        total_steps = int(args.steps)
    else:
        total_steps = max(1, math.ceil((args.epochs or 1.0) * len(train_rows) / positives_per_step))
    if total_steps < 1:
        raise UserError("--steps must be >= 1")
    warmup_steps = int(args.warmup) if args.warmup >= 1 else int(round(args.warmup * total_steps))
    tia_steps = int(args.tia_warmup) if args.tia_warmup >= 1 else int(round(args.tia_warmup * total_steps))
    settings = dataclasses.replace(settings, unmasked_batches=tia_steps * args.grad_accum)

    # ---- optimizer, schedule, DDP
    # fused AdamW: one kernel per step on GPU; on this CPU it measured the same as foreach, so only there.
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-6,
                                  fused=rt.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps))
    start_step = 0
    position = StreamPosition()
    if resume_from is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        # The schedule follows the current --steps (a resumed run may extend it).
        scheduler.lr_lambdas = [lr_lambda(warmup_steps, total_steps)] * len(optimizer.param_groups)
        start_step = int(info["step"])
        positions = info.get("positions") or [[0, 0]]
        position = StreamPosition(*positions[rt.rank if rt.rank < len(positions) else 0])
        ckpt.set_rng_state(train_state["rng"])
    train_model: torch.nn.Module = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    tasks = model.tasks
    weighter = TaskWeighter(args.task_weights, model, tasks, distributed=rt.distributed)
    idle_params = [p for m in (model.mlm_head, model.mpm_head) for p in m.parameters()]
    matching = [t for t in tasks if t in MATCHING_TASKS]
    warmup_weights = torch.tensor([1.0 / len(matching) if t in matching else 0.0 for t in tasks])

    s100 = None
    if rt.main and len(val_rows):
        s100 = build_sample_hundred(texts, index, val_rows, reader, queries=args.val_queries,
                                    max_pool=args.val_max_images, seed=args.split_seed)
    metrics = MetricsLog(out / METRICS, start_step if resume_from is not None else None, rt.main)
    if rt.main:
        _log(f"train: {len(train_rows)} images / {len(train_products)} products for training, {len(val_rows)} images "
             f"held out; {rt.world} process(es) on {rt.device} ({rt.precision}); steps {start_step}->{total_steps}, "
             f"{positives_per_step} positives x (1+{args.neg_ratio}) rows per step; {'+'.join(matching)} alone for {tia_steps} steps, "
             f"then {'/'.join(tasks)} with task weights {args.task_weights}")
        if index.skipped_no_text:
            _log(f"train: {index.skipped_no_text} image rows skipped (their product has no text)")
    batches_iter = iter_batches(stream, pairs, settings, vocab, args.seed, position, first_index=start_step * args.grad_accum)
    batches = Prefetcher(batches_iter, args.prefetch) if args.prefetch > 0 else batches_iter

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not (rt.main and args.progress), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
    last_train: dict[str, Any] = {}
    last_val: dict[str, Any] = {}
    pairs_rate_ema = None
    last_saved = start_step if resume_from is not None else -1
    step = start_step
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            task_sum = torch.zeros(len(tasks))
            w_sum = torch.zeros(len(tasks))
            n_sum = torch.zeros(len(tasks))
            rows = 0
            for micro in range(args.grad_accum):
                batch = next(batches).to(rt.device)
                # DDP syncs gradients only on the last micro-batch of a step.
                sync = contextlib.nullcontext() if (not rt.distributed or micro == args.grad_accum - 1) else train_model.no_sync()
                with sync:
                    torch.manual_seed(_step_seed(args.seed, rt.rank, batch.index))  # dropout: same draws on resume
                    weighter.reset()
                    with rt.autocast():
                        output = train_model(**batch.model_inputs())
                    if batch.tia_only:
                        # The idle heads join the graph at zero cost so that DDP sees every parameter used.
                        total = sum(w.item() * output.losses[t] for w, t in zip(warmup_weights, tasks) if w > 0)
                        total = total + 0.0 * sum(p.sum() for p in idle_params)
                        weights, n = warmup_weights, torch.zeros(len(tasks))
                    else:
                        total, weights, n = weighter(output.losses)
                    (total / args.grad_accum).backward()
                nan = torch.tensor(float("nan"))
                task_sum += torch.stack([output.losses[t].detach().float().cpu() if t in output.losses else nan for t in tasks])
                w_sum += weights
                n_sum += n
                rows += batch.rows
                position = batch.position
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad if args.clip_grad > 0 else float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            reduced = rt.all_reduce_mean(torch.cat([task_sum / args.grad_accum, torch.tensor([float(rows)])]))
            losses = reduced[: len(tasks)]
            rows_global = float(reduced[-1]) * rt.world
            weights = w_sum / args.grad_accum
            n_mean = n_sum / args.grad_accum
            elapsed = time.perf_counter() - t0
            rate = rows_global / max(elapsed, 1e-9)
            pairs_rate_ema = rate if pairs_rate_ema is None else 0.9 * pairs_rate_ema + 0.1 * rate
            loss_total = float((weights * torch.nan_to_num(losses)).sum())
            last_train = {"kind": "train", "step": step, "epoch": position.epoch, "lr": lr, "loss": loss_total,
                          "grad_norm": float(grad_norm), "pairs": rows_global, "pairs_per_s": rate,
                          "step_seconds": elapsed, "time": time.time() - t_start}
            for i, t in enumerate(tasks):
                last_train[f"loss_{t}"] = None if math.isnan(float(losses[i])) else float(losses[i])
                last_train[f"w_{t}"] = float(weights[i])
                last_train[f"n_{t}"] = float(n_mean[i])
            metrics.write(last_train)
            bar.set_postfix_str(
                f"loss {loss_total:.3f} | " + " ".join(f"{t} {float(losses[i]):.3f}" for i, t in enumerate(tasks)
                                                       if not math.isnan(float(losses[i])))
                + " | w " + "/".join(f"{float(weights[i]):.2f}" for i in range(len(tasks)))
                + f" | {pairs_rate_ema:.1f} pairs/s", refresh=False)
            bar.update(1)

            final = step == total_steps
            fusion = None  # the score fusion fitted at this step's validation, saved with this step's checkpoint
            if s100 is not None and ((args.val_every and step % args.val_every == 0) or final):
                last_val, fusion = _validate(model, s100, config, rt, step)
                metrics.write(last_val)
                bar.write(_validation_line(last_val))
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or final:
                _save(rt, out, step, model, tokenizer, optimizer, scheduler, options, position, args, last_train, last_val,
                      fusion)
                last_saved = step
                if rt.main:
                    _try_plot(out)
            if kill_at and step == kill_at:
                bar.close()
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        if isinstance(batches, Prefetcher):
            batches.close()
    if last_saved != step:  # resumed at or past the end: make sure the final state is on disk
        _save(rt, out, step, model, tokenizer, optimizer, scheduler, options, position, args, last_train, last_val)

    summary: dict[str, Any] = {}
    if rt.main:
        final_ckpt = ckpt.latest_checkpoint(out)
        model_dir = ckpt.export_model(final_ckpt, out / ckpt.MODEL_DIR)
        if not last_val and s100 is not None:  # resumed at the end: report; the checkpoint keeps its own fusion
            last_val, _ = _validate(model, s100, config, rt, step)
            metrics.write(last_val)
        metrics.close()
        plot = _try_plot(out)
        summary = {
            "final_step": step, "total_steps": total_steps, "model_dir": str(model_dir), "checkpoint": str(final_ckpt),
            "metrics_path": str(out / METRICS), "curves_path": str(plot) if plot else None,
            "train": {k: v for k, v in last_train.items() if k != "kind"},
            "validation": {k: v for k, v in last_val.items() if k != "kind"},
            "resumed_from": str(resume_from) if resume_from else None,
            "device": str(rt.device), "precision": rt.precision, "world_size": rt.world,
            "train_images": int(len(train_rows)), "validation_images": int(len(val_rows)),
            "seconds": time.time() - t_start,
        }
        tmp = out / f".{SUMMARY}.tmp"
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out / SUMMARY)
        _log(f"train: done at step {step}; model in {model_dir}")
    rt.barrier()
    return summary


def _step_seed(seed: int, rank: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, rank, index, 0xD209]).generate_state(1)[0])


def _validate(model, s100, config, rt, step: int):
    val, fusion = validate(model, s100, config, rt)
    return {"kind": "validation", "step": step, **val}, fusion


def _validation_line(val: dict) -> str:
    heads = f"TIA alone {val['rank1_t2i_tia']:.3f}" + (f", itc alone {val['rank1_t2i_itc']:.3f}"
                                                       if "rank1_t2i_itc" in val else "")
    return (f"step {val['step']}: validation Rank@1 t2i {val['rank1_t2i']:.3f} ({heads}), TIA acc "
            f"{val['tia_accuracy']:.3f}, AUC {val['tia_auc']:.3f}")


def _save(rt, out, step, model, tokenizer, optimizer, scheduler, options, position, args, last_train, last_val,
          fusion=None):
    positions = rt.all_gather_ints(position.as_list())
    if rt.main:
        info = {"options": options, "positions": positions, "batches_per_rank": step * args.grad_accum,
                "metrics": {"train": last_train, "validation": last_val}}
        ckpt.save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, info, keep=args.keep_checkpoints,
                             fusion=fusion)
    rt.barrier()


def _try_plot(out: Path) -> Path | None:
    try:
        return plot_curves(out / METRICS, out / CURVES)
    except ImportError as exc:  # matplotlib is optional on a bare GPU box
        _log(f"train: no training_curves.png ({exc})")
        return None


def _quiet(fn):
    """Run a transformers load without its progress bars and load reports (we print our own summary)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return fn()
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fashionbert train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
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
