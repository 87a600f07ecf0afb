"""Training benchmark. Prints figures; asserts nothing (speed targets live here, not in tests).

    python bench/train.py [--backbone minilm] [--batch-size 16] [--steps 12] [--text-words 40] [--fusion-layer K]
                          [--clean] [--precision auto] [--threads 0] [--profile]

Figures, each measured in this one run on this machine:
- this CPU's matmul GFLOP/s in fp32 and bf16, on the model's own FFN shape and on a square 2048^3 GEMM;
- the model's FLOPs per training pair, counted by torch's FlopCounterMode over one full training step
  (forward, the adaptive-grad probe, backward), with an analytic count beside it;
- end-to-end training pairs/s of `fashionbert.train` (Parquet stream, pairs, masking, autocast at train's precision
  -- bf16 where the CPU runs it natively, else fp32 --, adaptive-grad, AdamW) on a synthetic featurize folder with
  real shapes (8x8 x 1286 features (CNN + colour), texts of ~45 tokens), and its ratio to the FLOP bound (peak matmul
  GFLOP/s at that precision / FLOPs per pair); target >= 40%;
- the attention kernel of a training step, transformers' eager attention vs torch's fused sdpa on the same batches at
  train's precision: median step times and their ratio (train runs eager on a CPU in bf16: Runtime.training_attention);
- bf16 autocast vs fp32 on the same batches: per-task loss difference and train-step time (skipped on a CPU without
  native bf16, where autocast emulates it many times slower than fp32).

Steps are MLM/MPM-masked pretraining steps; `--clean` measures the matching-only steps instead (the TIA warm-up's, or
every step with `--tia-warmup` = all steps): no masks, TIA + itc at equal weights, and with late fusion the joint pass
takes its states below the fusion layer from the itc passes (`FashionBertModel._shares_below_fusion`); the run also
times the same steps with the joint pass computed in full and prints the ratio, and counts and times `--itc-warmup`'s
steps (the itc task alone, no joint pass) against them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.flops import matmul_gflops  # noqa: E402
from fashionbert.data.batching import (BatchSettings, ImageStream, MaskingVocab, PairBuilder, StreamPosition,
                                       iter_batches)
from fashionbert.data.features import FeatureReader, index_images, load_texts, open_feature_folders  # noqa: E402
from fashionbert.model.backbone import load_tokenizer  # noqa: E402
from fashionbert.model.config import FashionBertConfig  # noqa: E402
from fashionbert.model.hard_negatives import MiningBank  # noqa: E402
from fashionbert.model.modeling import FashionBertModel  # noqa: E402
from fashionbert.model.patch_cnn import FEATURE_DIM  # noqa: E402
from fashionbert.runtime import PRECISIONS, Runtime, cpu_has_native_bf16, resolve_precision  # noqa: E402
from fashionbert.train.adaptive_loss import TaskWeighter  # noqa: E402
from fashionbert.train.optim import build_optimizer  # noqa: E402
from fashionbert.train.state import fusion_layer  # noqa: E402
from fashionbert.train.trainer import TrainConfig, run  # noqa: E402
from tests.fake_features import write_fake_features  # noqa: E402


def analytic_flops_per_pair(cfg: FashionBertConfig, text_len: float, mlm_tokens: float, mpm_patches: float,
                            aligned_share: float, shared_below_fusion: bool = False) -> float:
    """Matmul FLOPs of one training pair: 3x forward (forward + backward), encoder + heads, plus the itc task's
    text-only and image-only passes on the aligned rows when the model has an itc head. `shared_below_fusion`: the
    joint pass runs only the layers from the fusion up (a clean late-fusion batch)."""
    h, i = cfg.hidden_size, int(cfg.bert["intermediate_size"])
    layers, v, d = int(cfg.bert["num_hidden_layers"]), cfg.vocab_size, cfg.feature_dim

    def encoder(seq: float, n: int = layers) -> float:
        return n * (2 * seq * (4 * h * h + 2 * h * i) + 2 * 2 * seq * seq * h)

    patch_projection = 2 * cfg.num_patches * d * h
    below = int(cfg.fusion_layer)  # late fusion: below it text and patches attend apart
    joint = encoder(text_len + cfg.num_patches, layers - below)
    if not shared_below_fusion:
        joint += encoder(text_len, below) + encoder(cfg.num_patches, below) + patch_projection
    fwd = joint + 2 * h * h  # + pooler
    fwd += mlm_tokens * 2 * (h * h + h * v) + mpm_patches * 2 * (h * h + h * d)
    if cfg.itc_dim:
        fwd += aligned_share * (encoder(text_len) + encoder(cfg.num_patches) + patch_projection + 4 * h * cfg.itc_dim)
    return 3.0 * fwd


def batches_for(features: Path, cfg: FashionBertConfig, tokenizer, batch_size: int, seed: int = 0, clean: bool = False):
    folders = open_feature_folders([features])
    texts = load_texts(folders)
    index = index_images(folders, texts)
    reader = FeatureReader(index.shards, cfg.num_patches, cfg.feature_dim)
    stream = ImageStream(index, np.arange(len(index)), reader, seed=seed)
    # as training's defaults: every negative mined from the itc similarity when the model has the itc head
    pairs = PairBuilder(texts, np.unique(index.product), hard_fraction=1.0 if cfg.itc_dim else 0.0)
    settings = BatchSettings(batch_size, cfg.max_text_len, cfg.pad_token_id, cfg.sep_token_id,
                             cfg.mlm_probability, cfg.mpm_probability, unmasked_batches=1 << 30 if clean else 0)
    return iter_batches(stream, pairs, settings, MaskingVocab.from_tokenizer(tokenizer, cfg.vocab_size), seed,
                        StreamPosition())


def step_loss(weighter, losses: dict, clean: bool) -> torch.Tensor:
    """The loss a training step backpropagates: adaptive-grad's weighted sum, or on a clean batch the matching tasks at
    equal weights (train's warm-up loss)."""
    if clean:
        matching = [losses[t] for t in ("tia", "itc") if t in losses]
        return sum(matching) / len(matching)
    return weighter(losses)[0]


def train_step(model, weighter, optimizer, batch, precision: str, clean: bool, joint: bool = True, bank=None):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(**batch.model_inputs(joint), mining_bank=bank)
    step_loss(weighter, out.losses, clean).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in out.losses.items()}


def timed_steps(model, weighter, batches, precision: str, clean: bool, joint: bool = True,
                attention: str | None = "train", bank=None) -> tuple[list[dict], list[float]]:
    """Train steps on `batches` from the model's current weights (restored afterwards) -> (losses, seconds) per step.
    `attention`: the implementation the steps run (FashionBertModel.attention); "train" = train's rule for this
    precision on the CPU (Runtime.training_attention). `bank`: train's --mining-bank (a MiningBank) the steps draw
    their mined negatives from too."""
    if attention == "train":
        attention = Runtime(torch.device("cpu"), precision).training_attention
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    torch.manual_seed(0)
    losses, times = [], []
    with model.attention(attention):
        for b in batches:
            t0 = time.perf_counter()
            losses.append(train_step(model, weighter, optimizer, b, precision, clean, joint, bank))
            times.append(time.perf_counter() - t0)
    model.load_state_dict(state)
    return losses, times


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
COPIES = ("aten::copy_", "aten::_to_copy", "aten::to")


def profile_steps(model, weighter, batches, precision: str, clean: bool, flops_per_step: float, peak: float) -> None:
    """Profile train steps on `batches` (the first a warm-up, not profiled; weights restored afterwards) and print the
    shares of self CPU time: matmuls, dtype casts and copies (aten::copy_: autocast's casts among them), the optimizer
    step, the rest."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, _ = build_optimizer(model, 1e-5, 0.01, torch.device("cpu"), lambda step: 1.0)  # train's AdamW
    with model.attention(Runtime(torch.device("cpu"), precision).training_attention):
        train_step(model, weighter, optimizer, batches[0], precision, clean)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for b in batches[1:]:
                train_step(model, weighter, optimizer, b, precision, clean)
    model.load_state_dict(state)
    steps = len(batches) - 1
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    copies = sum(e.self_cpu_time_total for e in events if e.key in COPIES)
    optim = max((e.cpu_time_total for e in events if e.key.startswith("Optimizer.step")), default=0)
    share = {"matmuls": matmul, "dtype casts and copies": copies, "the optimizer step": optim,
             "the rest": total - matmul - copies - optim}
    print(f"profile of {steps} steps ({total / 1e3 / steps:.0f} ms of CPU time each): "
          + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in share.items())
          + f"; the matmuls run at {flops_per_step * steps / (matmul / 1e6) / 1e9:.0f} GFLOP/s "
            f"({100 * flops_per_step * steps / (matmul / 1e6) / 1e9 / peak:.0f}% of the peak)")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    print("top ops by self CPU time: " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.1f}%" for e in top))


def median_after_first(times: list[float]) -> float:
    return statistics.median(times[1:] or times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--batch-size", type=int, default=16, help="positives per step (x2 rows with --neg-ratio 1)")
    ap.add_argument("--steps", type=int, default=12, help="training steps timed end to end (after 2 warm-up steps)")
    ap.add_argument("--text-words", type=int, default=40, help="filler words per synthetic text (40 -> ~45 tokens)")
    ap.add_argument("--feature-dim", type=int, default=FEATURE_DIM)
    ap.add_argument("--itc-dim", type=int, default=256, help="the itc task's projection, 0 = off (train's default 256)")
    ap.add_argument("--fusion-layer", type=int, default=None,
                    help="late fusion's first joint layer (default train's: half the backbone's layers; 0 = single stream)")
    ap.add_argument("--clean", action="store_true",
                    help="measure matching-only steps (no MLM/MPM masks; the TIA warm-up's) instead of masked ones")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="of the timed training; auto = train's rule: bf16 where the CPU runs it natively, else fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default (all cores)")
    ap.add_argument("--compare-steps", type=int, default=3, help="steps per precision in the bf16/fp32 comparison")
    ap.add_argument("--profile", action="store_true",
                    help="also profile 3 training steps (torch.profiler) and print where their CPU time goes: matmuls "
                         "(and the rate they run at against the peak), dtype casts and copies, the optimizer, the "
                         "rest, and the top ops")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    precision = resolve_precision(a.precision, torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU bf16 native: {cpu_has_native_bf16()}; "
          f"training in {precision}")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        tokenizer = load_tokenizer(a.backbone)
        features = write_fake_features(tmp / "features", n_products=160, feature_dim=a.feature_dim,
                                       n_image_shards=2, row_group_size=64, extra_words=a.text_words,
                                       tokenizer=tokenizer)
        torch.manual_seed(0)
        fusion = fusion_layer(TrainConfig(backbone=a.backbone, fusion_layer=a.fusion_layer))  # train's default
        cfg = FashionBertConfig(backbone=a.backbone, feature_dim=a.feature_dim, itc_dim=a.itc_dim, fusion_layer=fusion,
                                dropout=TrainConfig().dropout)  # as train builds it
        model = FashionBertModel.from_pretrained_backbone(cfg).train()
        it = batches_for(features, cfg, tokenizer, a.batch_size, clean=a.clean)
        sample = [next(it) for _ in range(4)]

        def rows_of(b):  # the joint pass's rows: the batch's and the negatives the step mines
            return b.rows + (len(b.mining.anchors) if b.mining is not None else 0)

        rows = rows_of(sample[0])
        text_len = float(np.mean([b.attention_mask.sum(1).float().mean() for b in sample]))
        padded_len = float(np.mean([b.input_ids.shape[1] for b in sample]))
        mlm_tok = float(np.mean([((b.mlm_labels != -100) & b.tia_labels.bool()[:, None]).sum() / rows_of(b) for b in sample]))
        mpm_p = float(np.mean([(b.patch_mask & b.tia_labels.bool()[:, None]).sum() / rows_of(b) for b in sample]))
        aligned = float(np.mean([b.tia_labels.float().sum() / rows_of(b) for b in sample]))
        shared = a.clean and bool(fusion) and a.itc_dim > 0  # batches_for mines every negative: all rows aligned
        h = cfg.hidden_size

        # ---- the CPU's matmul rate
        m_ffn = int(rows * (padded_len + cfg.num_patches))
        rates = {}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rates[name] = {"ffn": matmul_gflops(m_ffn, h, 4 * h, dt), "square": matmul_gflops(2048, 2048, 2048, dt)}
            print(f"matmul {name}: {rates[name]['ffn']:.1f} GFLOP/s on the FFN shape {m_ffn}x{h}x{4 * h}, "
                  f"{rates[name]['square']:.1f} GFLOP/s on 2048^3")

        # ---- FLOPs per pair, counted
        from torch.utils.flop_counter import FlopCounterMode

        weighter = TaskWeighter("adaptive-grad", model, model.tasks)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        with FlopCounterMode(display=False) as counter:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(**sample[0].model_inputs())
            step_loss(weighter, out.losses, a.clean).backward()
        optimizer.zero_grad(set_to_none=True)
        counted = counter.get_total_flops() / rows
        analytic = analytic_flops_per_pair(cfg, padded_len, mlm_tok, mpm_p, aligned, shared)
        print(f"batch: {rows} rows, text {text_len:.1f} tokens (padded {padded_len:.1f}) + {cfg.num_patches} patches; "
              f"tasks {'/'.join(sorted(out.losses, key=model.tasks.index))}; fusion layer {fusion}"
              f"{' (joint pass from the itc passes below it)' if shared else ''}; FLOPs per training pair: counted {counted / 1e9:.2f} G, analytic {analytic / 1e9:.2f} G")

        # ---- what the shared below-fusion states save: the same clean steps with the joint pass in full
        if shared:
            _, with_sharing = timed_steps(model, weighter, sample * 2, precision, clean=True)
            model._shares_below_fusion = lambda *args: False  # this instance only: the joint pass from the embeddings
            with FlopCounterMode(display=False) as counter:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = model(**sample[0].model_inputs())
                step_loss(weighter, out.losses, True).backward()
            model.zero_grad(set_to_none=True)
            _, in_full = timed_steps(model, weighter, sample * 2, precision, clean=True)
            del model._shares_below_fusion
            ts, tf = median_after_first(with_sharing), median_after_first(in_full)
            print(f"clean step, joint pass from the itc passes below the fusion vs in full: {counted / 1e9:.2f} vs "
                  f"{counter.get_total_flops() / rows / 1e9:.2f} GFLOP per pair, median step {ts:.2f} vs {tf:.2f} s "
                  f"({tf / ts:.2f}x)")

            # An --itc-warmup step on the same batches: the itc passes alone, no joint pass. Per step, not per pair:
            # the budget counts steps of --batch-size positives, and this step has no mined rows.
            with FlopCounterMode(display=False) as counter:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = model(**sample[0].model_inputs(joint=False))
                step_loss(weighter, out.losses, True).backward()
            model.zero_grad(set_to_none=True)
            _, itc_alone = timed_steps(model, weighter, sample * 2, precision, clean=True, joint=False)
            fi, fj, ti = counter.get_total_flops() / 1e9, counted * rows / 1e9, median_after_first(itc_alone)
            print(f"--itc-warmup step (itc alone) vs clean joint step: {fi:.1f} vs {fj:.1f} GFLOP per step "
                  f"({fi / fj:.2f}), median step {ti:.2f} vs {ts:.2f} s ({ti / ts:.2f})")

            # --mining-bank: the same clean steps drawing their negatives from a bank of other batches' positives too,
            # whose sides the late-fusion shortcut encodes up to the fusion layer
            bank = MiningBank(2048)
            with torch.no_grad(), model.attention(Runtime(torch.device("cpu"), precision).training_attention):
                for _ in range(8):
                    model(**next(it).model_inputs(), mining_bank=bank)
            _, plain = timed_steps(model, weighter, sample * 2, precision, clean=True)
            _, banked = timed_steps(model, weighter, sample * 2, precision, clean=True, bank=bank)
            tp, tb = median_after_first(plain), median_after_first(banked)
            print(f"clean joint step with --mining-bank ({len(bank)} positives) vs without: median step {tb:.2f} vs "
                  f"{tp:.2f} s ({tb / tp:.2f}x)")

        # ---- the attention kernel of a training step: eager vs sdpa on the same batches, at train's precision
        runs = {name: timed_steps(model, weighter, sample * 2, precision, a.clean, attention=name)
                for name in ("sdpa", "eager")}
        ts, te = median_after_first(runs["sdpa"][1]), median_after_first(runs["eager"][1])
        loss_diff = max(abs(x[t] - y[t]) for x, y in zip(runs["sdpa"][0], runs["eager"][0]) for t in x)
        chosen = Runtime(torch.device("cpu"), precision).training_attention or "sdpa"
        print(f"attention in a {precision} training step: median step {ts:.2f} s sdpa vs {te:.2f} s eager ({ts / te:.2f}x); "
              f"max |loss diff| {loss_diff:.4f}; train runs {chosen} here")

        # ---- bf16 vs fp32 on the same batches
        if cpu_has_native_bf16():
            compare = {p: timed_steps(model, weighter, sample[: a.compare_steps], p, a.clean) for p in ("fp32", "bf16")}
            tasks = list(compare["fp32"][0][0])
            same = list(zip(compare["fp32"][0], compare["bf16"][0]))
            diffs = {t: max(abs(x[t] - y[t]) for x, y in same) for t in tasks}
            rel = {t: max(abs(x[t] - y[t]) / max(abs(x[t]), 1e-9) for x, y in same) for t in tasks}
            t32, t16 = median_after_first(compare["fp32"][1]), median_after_first(compare["bf16"][1])
            print("bf16 vs fp32 (same weights, batches, masks): max |loss diff| "
                  + ", ".join(f"{t} {diffs[t]:.4f} ({100 * rel[t]:.2f}%)" for t in diffs)
                  + f"; train step {t32:.2f} s fp32 vs {t16:.2f} s bf16 ({t32 / t16:.2f}x)")
        else:
            print("bf16 vs fp32: skipped, this CPU has no native bf16 (autocast would emulate it, many times slower "
                  "than fp32; train's --precision auto picks fp32 here)")
        if a.profile:
            profile_steps(model, weighter, sample, precision, a.clean, counted * rows, max(rates[precision].values()))
        del model, weighter

        # ---- end to end: fashionbert.train
        config = TrainConfig(features=[str(features)], out=str(tmp / "out"), backbone=a.backbone, steps=a.steps + 2,
                             batch_size=a.batch_size, val_fraction=0.0, checkpoint_every=0, progress=False,
                             precision=precision, itc_dim=a.itc_dim, tia_warmup=a.steps + 2 if a.clean else 0.0,
                             fusion_layer=fusion)
        t0 = time.perf_counter()
        run(config)
        wall = time.perf_counter() - t0
        recs = [json.loads(l) for l in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in recs if r.get("kind") == "train"][2:]
        step_s = sum(r["step_seconds"] for r in timed)
        pairs = sum(r["pairs"] for r in timed)
        rate = pairs / step_s
        peak = max(rates[precision].values())
        bound = peak * 1e9 / counted
        print(f"train end to end ({precision}, {'matching tasks only' if a.clean else 'adaptive-grad'}, batch {rows} rows): {rate:.1f} pairs/s over {len(timed)} steps "
              f"(median step {statistics.median(r['step_seconds'] for r in timed):.2f} s; whole run incl. model load "
              f"and export {wall:.1f} s)")
        print(f"FLOP bound: {peak:.1f} GFLOP/s {precision} / {counted / 1e9:.2f} GFLOP per pair = {bound:.1f} pairs/s; "
              f"achieved {rate * counted / 1e9:.1f} GFLOP/s = {100 * rate / bound:.1f}% of the bound (target >= 40%)")
        other = "fp32" if precision == "bf16" else "bf16"
        print(f"for reference, {other} bound {max(rates[other].values()) * 1e9 / counted:.1f} pairs/s")


if __name__ == "__main__":
    main()
