"""Featurize benchmark on hm-dev photos. Prints figures; asserts nothing (speed targets live here, not in tests).

    python bench/featurize.py [--images 1000] [--workers 2] [--rss-sizes 1000,5000] [--skip-patch]

Figures, each measured in this one run on this machine:
- bare CNN: images/s of the batched patch CNN alone on pre-decoded squares, bf16 and fp32, and the
  largest |bf16 - fp32| feature difference (+ mean cosine);
- pipeline: end-to-end images/s of `fashionbert featurize` (Beam FnApiRunner, decode + CNN + Parquet) at its
  default `--precision auto` (bf16 on a CPU with native bf16, else fp32), grid and patch modes, and its ratio
  to the bare CNN in the same mode and precision (target >= 0.8 in grid mode);
- peak RSS of a featurize process at each --rss-sizes catalog size (target: flat within 20%).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fashionbert.model.patch_cnn import PatchCNN, run_batched  # noqa: E402
from fashionbert.runtime import cpu_has_native_bf16, resolve_precision  # noqa: E402
from pipelines.decode import decode_image, fit_square  # noqa: E402
from tests.featurize_helpers import hm_subset  # noqa: E402

HM = os.path.join(ROOT, "..", "shared", "data", "hm-dev")
HM_ARGS = ["--id-column", "article_id", "--text-columns", "prod_name,colour_group_name,detail_desc",
           "--category-column", "product_group_name", "--subcategory-column", "product_type_name",
           "--group-column", "product_code"]


def subset_manifest(folder: str, n: int) -> str:
    return hm_subset(folder, n, HM)


def squares(manifest: str, limit: int) -> np.ndarray:
    with open(manifest, newline="") as fh:
        paths = [r["image"] for r in csv.DictReader(fh)][:limit]
    return np.stack([fit_square(decode_image(open(p, "rb").read()), 256) for p in paths])


def bare_cnn(mode: str, images: np.ndarray, precision: str, batch: int = 32) -> tuple[float, np.ndarray]:
    model = PatchCNN(mode=mode)
    run_batched(model, images[:batch], precision)  # warm-up: first call pays for allocation
    t0 = time.perf_counter()
    out = [run_batched(model, images[i:i + batch], precision) for i in range(0, len(images), batch)]
    return len(images) / (time.perf_counter() - t0), np.concatenate(out)


def bare_cnn_workers(images: np.ndarray, workers: int, precision: str, batch: int = 32) -> float:
    """The pipeline's own arrangement: `workers` threads, each running whole batches with one torch thread."""
    from concurrent.futures import ThreadPoolExecutor

    model = PatchCNN(mode="grid")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_batched(model, images[:batch], precision)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda i: run_batched(model, images[i:i + batch], precision), range(0, len(images), batch)))
        return len(images) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def pipeline(manifest: str, out: str, mode: str, workers: int) -> tuple[float, int]:
    """Wall time of the CLI as a user runs it, in a child process; returns (images/s, peak RSS MB)."""
    cmd = [sys.executable, "-m", "fashionbert.commands.cli", "featurize", "--catalog", manifest, "--out", out,
           "--patch-mode", mode, "--no-progress", "--overwrite", f"--direct_num_workers={workers}", *HM_ARGS]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_fh, tempfile.TemporaryFile("w+") as err_fh:
        proc = subprocess.Popen(cmd, stdout=out_fh, stderr=err_fh, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the max over all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - t0
        out_fh.seek(0), err_fh.seek(0)
        stdout, stderr = out_fh.read(), err_fh.read()
    if proc.returncode:
        sys.exit(f"featurize failed:\n{stderr[-3000:]}")
    n = int(stdout.split(" images,")[0].rsplit(" ", 1)[-1])
    return n / elapsed, usage.ru_maxrss // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--bare-images", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rss-sizes", default="1000,5000")
    ap.add_argument("--skip-patch", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = tempfile.mkdtemp(prefix="bench-featurize-")
    auto = resolve_precision("auto", torch.device("cpu"))  # what featurize's --precision auto picks on this machine
    print(f"cores={os.cpu_count()} torch={torch.__version__} images={args.images} workers={args.workers} "
          f"native bf16={cpu_has_native_bf16()} (featurize --precision auto: {auto})")

    manifest = subset_manifest(tmp, max(args.images, args.bare_images))
    imgs = squares(manifest, args.bare_images)
    modes = ["grid"] + ([] if args.skip_patch else ["patch"])
    bare = {}
    for mode in modes:
        r16, f16 = bare_cnn(mode, imgs, "bf16")
        r32, f32 = bare_cnn(mode, imgs, "fp32")
        a, b = f16.reshape(len(imgs), -1), f32.reshape(len(imgs), -1)
        cos = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
        bare[mode] = {"bf16": r16, "fp32": r32}[auto]
        print(f"bare CNN {mode:5s}: bf16 {r16:6.1f} img/s, fp32 {r32:6.1f} img/s, speed-up {r16 / r32:.2f}x; "
              f"max |bf16-fp32| {np.abs(a - b).max():.4f} (feature scale max {np.abs(b).max():.2f}), "
              f"mean cosine {cos:.4f}")

    like = bare_cnn_workers(imgs, args.workers, auto)
    print(f"bare CNN grid : {auto} {like:6.1f} img/s as {args.workers} worker threads x 1 torch thread "
          f"(the pipeline's arrangement)")
    bare["grid"] = max(bare["grid"], like)  # compare the pipeline with the faster of the two bare set-ups

    for mode in modes:
        n = args.images if mode == "grid" else min(args.images, 300)
        m = subset_manifest(tmp, n)
        rate, _ = pipeline(m, os.path.join(tmp, f"out-{mode}"), mode, args.workers)
        print(f"pipeline {mode:5s}: {rate:6.1f} img/s end-to-end over {n} images "
              f"(incl. start-up, decode, Parquet, {auto}); ratio to the best bare {auto} CNN {rate / bare[mode]:.2f}")

    sizes = [int(s) for s in args.rss_sizes.split(",") if s]
    rss = []
    for n in sizes:
        m = subset_manifest(tmp, n)
        rate, peak = pipeline(m, os.path.join(tmp, f"out-rss-{n}"), "grid", args.workers)
        rss.append(peak)
        print(f"peak RSS at {n:5d} images: {peak} MB ({rate:.1f} img/s)")
    if len(rss) > 1:
        print(f"peak RSS growth {sizes[0]} -> {sizes[-1]} images: {100 * (rss[-1] / rss[0] - 1):+.1f}%")


if __name__ == "__main__":
    main()
