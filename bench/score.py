"""Scoring and retrieval benchmark. Prints figures; asserts nothing (targets live here, not in tests).

    python bench/score.py [--threads 0] [--pairs 512] [--catalog 5000] [--recall-k 100] [--gallery 1000]
    python bench/score.py --skip 1,2,3 --beam-features FEATURES --beam-model MODEL [--beam-pairs 1280]

Figures, each measured in this one run on this machine:
1. Cross-encoder throughput: pairs/s of `CrossEncoderScorer` with the packaged MiniLM backbone and real shapes
   (8x8 x 1286 features (CNN + colour), texts of ~45 tokens, 8 pairs per image as in a re-rank), bf16 where native; its ratio
   to this CPU's FLOP bound (peak matmul GFLOP/s on the encoder's FFN shape / executed FLOPs per pair; target
   >= 50%); and the unfactored `FashionBertModel.score` on padded batches for comparison.
2. A 5k-image x 5k-text catalog: two-stage wall time (dual embedding of every item, faiss recall both ways,
   re-rank of the distinct recalled pairs) vs the exhaustive cross-encoder over all 25M pairs; embedding and
   re-rank rates are measured on slices and extrapolated, the faiss search runs in full on vectors of the
   real dimension.
3. Quality on 1k x 1k held-out products: a FashionBERT trained here by `fashionbert train` (four tasks, itc
   included) on synthetic features, full-gallery Rank@10 of two-stage retrieval vs the exhaustive cross-encoder for
   several recall-k, with the compute each needs (target: >= 95% of exhaustive at >= 10x less compute).
4. (`--beam-features DIR --beam-model DIR`) The cross-encoder through Beam: score-pairs' pipeline (RunInference
   with the model handler, pipelines/score_pairs.py) against the single-process score-pairs on the same pairs of
   real features, one torch thread per worker process: on Beam's PortableRunner (embedded job server, workers from a
   worker pool this script starts; it gives a job one worker process), and on the FnApiRunner with 1 and 2 worker
   processes (`--direct_running_mode multi_processing`). Pairs/s by wall time (model loading included), pairs per
   CPU-second (the processes together), and the 2-worker / 1-worker ratio, all from this one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.flops import matmul_gflops  # noqa: E402
from fashionbert.data.batching import pad_texts  # noqa: E402
from fashionbert.data.feature_catalog import ArrayImages
from fashionbert.data.features import (FeatureReader, index_images, load_texts, open_feature_folders,  # noqa: E402
                                       validation_mask)
from fashionbert.evaluation.evaluate import gallery_ranks, recall_at  # noqa: E402
from fashionbert.model.config import FashionBertConfig  # noqa: E402
from fashionbert.model.modeling import FashionBertModel  # noqa: E402
from fashionbert.model.patch_cnn import FEATURE_DIM  # noqa: E402
from fashionbert.rank.cross_encoder import CrossEncoderScorer
from fashionbert.rank.neighbours import search  # noqa: E402
from fashionbert.rank.retrieve import dual_encoder_for, rank_rows, two_stage  # noqa: E402
from fashionbert.runtime import Runtime, resolve_runtime  # noqa: E402
from tests.fake_features import make_tiny_backbone, write_fake_features  # noqa: E402


def encoder_flops(cfg: FashionBertConfig, seq: float) -> float:
    """Matmul FLOPs of one sequence through the encoder (+ pooler and TIA head)."""
    h, i, layers = cfg.hidden_size, int(cfg.bert["intermediate_size"]), int(cfg.bert["num_hidden_layers"])
    per_layer = 2 * seq * (4 * h * h + 2 * h * i) + 2 * 2 * seq * seq * h
    return layers * per_layer + 2 * h * h + 2 * h * 2


def patch_projection_flops(cfg: FashionBertConfig) -> float:
    return 2.0 * cfg.num_patches * cfg.feature_dim * cfg.hidden_size


def load_all(features: Path):
    folders = open_feature_folders([features])
    texts = load_texts(folders)
    index = index_images(folders, texts)
    reader = FeatureReader(index.shards, folders[0].num_patches, folders[0].feature_dim)
    feats = reader.read(index.shard, index.row_group, index.row)
    return texts, index, reader, feats


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


# ============================================================================================ 1. throughput
def throughput_inputs(tmp: Path, n_pairs: int):
    """Real shapes for the throughput measurement: texts of ~45 tokens, 8x8 x 1286 features, 8 pairs per image as in
    a re-rank -> (text ids, features, pairs (text, image))."""
    images_used = max(1, n_pairs // 8)
    n_products = max(96, images_used)
    features = write_fake_features(tmp / "minilm-features", n_products=n_products, feature_dim=FEATURE_DIM,
                                   n_image_shards=1, row_group_size=n_products, extra_words=40)
    texts, _, _, feats = load_all(features)
    text_ids = [t[0] for t in texts.input_ids]
    rng = np.random.default_rng(0)
    pairs = np.stack([rng.integers(0, len(text_ids), n_pairs), rng.integers(0, images_used, n_pairs)], axis=1)
    return text_ids, feats, pairs


def scorer_pairs_per_s(model: FashionBertModel, rt: Runtime, text_ids, feats, pairs) -> tuple[float, CrossEncoderScorer]:
    """`CrossEncoderScorer`'s pairs/s on these pairs, after a warm-up on 64 of them -> (rate, the scorer)."""
    scorer = CrossEncoderScorer(model, rt)
    scorer.score(text_ids, ArrayImages(feats), pairs[:64])  # warm-up
    _, seconds = timed(scorer.score, text_ids, ArrayImages(feats), pairs)
    return len(pairs) / seconds, scorer


def bench_throughput(tmp: Path, rt: Runtime, n_pairs: int):
    print("\n== 1. cross-encoder throughput (packaged MiniLM, 8x8 x 1286 features (CNN + colour)) ==")
    text_ids, feats, pairs = throughput_inputs(tmp, n_pairs)
    model = FashionBertModel.from_pretrained_backbone(FashionBertConfig(feature_dim=FEATURE_DIM)).eval()
    cfg = model.config
    lengths = np.array([min(len(t), cfg.max_text_len) for t in text_ids])
    images_used = max(1, n_pairs // 8)  # as throughput_inputs draws them
    rate, scorer = scorer_pairs_per_s(model, rt, text_ids, feats, pairs)
    mean_len = float(lengths[pairs[:, 0]].mean())
    per_pair = encoder_flops(cfg, mean_len + cfg.num_patches)
    executed = per_pair + patch_projection_flops(cfg) * images_used / n_pairs
    dtype = torch.bfloat16 if rt.precision == "bf16" else torch.float32
    peak = matmul_gflops(8192, cfg.hidden_size, int(cfg.bert["intermediate_size"]), dtype)
    bound = peak * 1e9 / executed
    print(f"texts: mean {mean_len:.1f} tokens (+{cfg.num_patches} patches); {n_pairs} pairs over {images_used} images; "
          f"precision {rt.precision}, {torch.get_num_threads()} threads")
    print(f"peak matmul ({8192}x{cfg.hidden_size}x{cfg.bert['intermediate_size']}, {dtype}): {peak:.1f} GFLOP/s")
    print(f"executed FLOPs per pair: {executed / 1e9:.3f} GFLOP (encoder {per_pair / 1e9:.3f} + amortised patch projection)")
    print(f"CrossEncoderScorer: {rate:.1f} pairs/s = {100 * rate / bound:.1f}% of the FLOP bound ({bound:.1f} pairs/s) "
          f"[target >= 50%]")
    # Unfactored reference: model.score on fixed batches of 64 in input order (padding to the batch's longest).
    n_ref = min(n_pairs, 256)
    t0 = time.perf_counter()
    with torch.inference_mode(), rt.autocast():
        for s in range(0, n_ref, 64):
            chunk = pairs[s:s + 64]
            ids, mask = pad_texts([text_ids[t] for t in chunk[:, 0]], cfg.max_text_len, cfg.pad_token_id, cfg.sep_token_id)
            model.score(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(feats[chunk[:, 1]]).float())
    ref_rate = n_ref / (time.perf_counter() - t0)
    print(f"unfactored model.score, batches of 64: {ref_rate:.1f} pairs/s (scorer is {rate / ref_rate:.2f}x)")
    # Dual-embedding rates for the catalog estimate.
    dual = dual_encoder_for(scorer)
    dual.embed_texts(text_ids[:8])  # warm-up
    _, t_text = timed(dual.embed_texts, text_ids)
    _, t_image = timed(dual.embed_images, [feats[s:s + 64] for s in range(0, len(feats), 64)])
    return {"pairs_per_s": rate, "texts_per_s": len(text_ids) / t_text, "images_per_s": len(feats) / t_image,
            "hidden": cfg.hidden_size}


# ============================================================================================ 2. catalog estimate
def bench_catalog(rates: dict, n: int, recall_k: int, dim: int):
    print(f"\n== 2. {n} images x {n} texts: two-stage vs exhaustive cross-encoder ==")
    rng = np.random.default_rng(0)
    # Clustered vectors (a catalog's embeddings are not uniform on the sphere): 50 topics + per-item noise.
    topics = rng.standard_normal((50, dim)).astype(np.float32)
    texts = topics[rng.integers(0, 50, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    images = texts[rng.permutation(n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    for v in (texts, images):
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    t2i, t_a = timed(search, images, texts, recall_k, "auto")
    i2t, t_b = timed(search, texts, images, recall_k, "auto")
    keys = np.unique(np.concatenate([t2i.query * n + t2i.candidate, i2t.candidate * n + i2t.query]))
    embed_s = n / rates["texts_per_s"] + n / rates["images_per_s"]
    rerank_s = len(keys) / rates["pairs_per_s"]
    two = embed_s + t_a + t_b + rerank_s
    exhaustive = n * n / rates["pairs_per_s"]
    print(f"embedding {n} texts + {n} images: {embed_s:.0f} s (measured {rates['texts_per_s']:.0f} texts/s, "
          f"{rates['images_per_s']:.0f} images/s); faiss {t2i.kind} search both ways ({dim}-d): {t_a + t_b:.2f} s")
    print(f"re-rank: {len(keys):,} distinct pairs (of {2 * n * recall_k:,} recalled) at {rates['pairs_per_s']:.1f} "
          f"pairs/s: {rerank_s:.0f} s")
    print(f"two-stage total: {two:.0f} s ({two / 3600:.2f} h); exhaustive {n * n:,} pairs: {exhaustive:.0f} s "
          f"({exhaustive / 3600:.1f} h) -> two-stage is {exhaustive / two:.1f}x faster")


# ============================================================================================ 3. quality
def train_small(features: Path, tmp: Path, rt: Runtime, steps: int, val_fraction: float, backbone: str,
                lr: float = 3e-4):
    """`fashionbert train` itself (MLM + MPM + TIA + itc under adaptive-grad weights, matching tasks alone for the
    first third) on the training products; returns the model as scoring loads it and the held-out mask (the
    same group-id split train used). The packaged MiniLM by default: a randomly initialised tiny backbone
    stayed on TIA's chance plateau for 250+ steps here."""
    from fashionbert.model.loading import load_model
    from fashionbert.train.trainer import TrainConfig
    from fashionbert.train.trainer import run as train_run

    if backbone == "tiny":
        backbone = str(make_tiny_backbone(tmp / "small-bert", layers=2, hidden=64, heads=2, intermediate=128))
    out = tmp / "quality-train"
    config = TrainConfig(features=[str(features)], out=str(out), backbone=backbone, steps=steps, batch_size=16, lr=lr,
                         tia_warmup=0.33, itc_dim=64, val_fraction=val_fraction, val_every=0, val_queries=50,
                         checkpoint_every=0, progress=False, device=rt.device.type, precision=rt.precision)
    t0 = time.perf_counter()
    summary = train_run(config)
    print(f"  trained {steps} steps in {time.perf_counter() - t0:.0f} s; validation {summary['validation']}")
    model = load_model(out / "model", rt).model
    folders = open_feature_folders([features])
    texts = load_texts(folders)
    index = index_images(folders, texts)
    held_out = validation_mask(texts.group_id, val_fraction, 0)
    reader = FeatureReader(index.shards, model.config.num_patches, model.config.feature_dim)
    return model, texts, index, reader, held_out


def bench_quality(tmp: Path, rt: Runtime, gallery: int, steps: int, ks: list[int], timed_k: int, backbone: str):
    print(f"\n== 3. full gallery on ~{gallery} held-out products: two-stage vs exhaustive ==")
    n_products = 2880
    features = write_fake_features(tmp / "quality-features", n_products=n_products, feature_dim=32, n_image_shards=4,
                                   row_group_size=256, extra_words=6)
    val_fraction = min(0.9, gallery / n_products)
    model, texts, index, reader, held_out = train_small(features, tmp, rt, steps, val_fraction, backbone)
    products = np.flatnonzero(held_out)
    rows = np.flatnonzero(held_out[index.product])
    feats = reader.read(index.shard[rows], index.row_group[rows], index.row[rows])
    position = {int(p): i for i, p in enumerate(products)}
    image_text = np.asarray([position[int(p)] for p in index.product[rows]])
    gallery_texts = [texts.input_ids[p][0] for p in products]
    images = ArrayImages(feats)
    scorer = CrossEncoderScorer(model, rt)
    dual = dual_encoder_for(scorer)
    n_t, n_i = len(products), len(rows)
    print(f"trained {steps} steps (fashionbert train, 4 tasks); gallery {n_t} texts x {n_i} images")

    result, two_s = timed(two_stage, scorer, dual, gallery_texts, images, timed_k)
    all_pairs = np.stack(np.meshgrid(np.arange(n_t), np.arange(n_i), indexing="ij"), -1).reshape(-1, 2)
    margins, ex_s = timed(scorer.score, gallery_texts, images, all_pairs)
    m = margins.reshape(n_t, n_i)
    cos = result.text_vectors @ result.image_vectors.T
    ex_t2i = rank_rows(all_pairs[:, 0], all_pairs[:, 1], cos.reshape(-1), margins)
    ex_i2t = rank_rows(all_pairs[:, 1], all_pairs[:, 0], cos.reshape(-1), margins)

    def t2i_true(q, c):
        return image_text[c] == q

    def i2t_true(q, c):
        return image_text[q] == c

    tq, iq = np.unique(image_text), np.arange(n_i)
    ex = (gallery_ranks(ex_t2i, t2i_true, tq, n_t), gallery_ranks(ex_i2t, i2t_true, iq, n_i))
    cfg = model.config
    text_len = float(np.mean([min(len(t), cfg.max_text_len) for t in gallery_texts]))
    pair_flops = encoder_flops(cfg, text_len + cfg.num_patches)
    embed_flops = n_t * encoder_flops(cfg, text_len) + n_i * encoder_flops(cfg, cfg.num_patches)
    print(f"exhaustive: {n_t * n_i:,} pairs in {ex_s:.1f} s; Rank@1/5/10 t2i "
          + "/".join(f"{100 * ex[0][f'rank{k}']:.1f}" for k in (1, 5, 10)) + ", i2t "
          + "/".join(f"{100 * ex[1][f'rank{k}']:.1f}" for k in (1, 5, 10)))
    print(f"two-stage at recall-k {timed_k}: {result.pairs_scored:,} pairs, {two_s:.1f} s wall "
          f"({ex_s / two_s:.1f}x faster than exhaustive)")
    print("recall-k | recall@k t2i/i2t | Rank@10 t2i (vs exh.) | Rank@10 i2t (vs exh.) | pairs | compute vs exhaustive")
    for k in ks:
        t2i = search(result.image_vectors, result.text_vectors, k, "flat")
        i2t = search(result.text_vectors, result.image_vectors, k, "flat")
        r_t2i = rank_rows(t2i.query, t2i.candidate, t2i.score, m[t2i.query, t2i.candidate])
        r_i2t = rank_rows(i2t.query, i2t.candidate, i2t.score, m[i2t.candidate, i2t.query])
        g_t = gallery_ranks(r_t2i, t2i_true, tq, n_t)["rank10"]
        g_i = gallery_ranks(r_i2t, i2t_true, iq, n_i)["rank10"]
        rec_t = recall_at(t2i, t2i_true, tq, n_t, [k])[f"recall@{k}"]
        rec_i = recall_at(i2t, i2t_true, iq, n_i, [k])[f"recall@{k}"]
        distinct = len(np.unique(np.concatenate([t2i.query * n_i + t2i.candidate, i2t.candidate * n_i + i2t.query])))
        ratio = (n_t * n_i * pair_flops) / (distinct * pair_flops + embed_flops)
        print(f"{k:8d} | {100 * rec_t:5.1f} / {100 * rec_i:5.1f} | {100 * g_t:5.1f} ({100 * g_t / max(ex[0]['rank10'], 1e-9):5.1f}%)"
              f" | {100 * g_i:5.1f} ({100 * g_i / max(ex[1]['rank10'], 1e-9):5.1f}%) | {distinct:,} | {ratio:.1f}x less")


# ============================================================================================ 4. Beam
def sdk_workers(parent: int) -> dict[int, float]:
    """CPU seconds so far of each live SDK worker process under `parent` (the worker pool, or this process for the
    FnApiRunner's multi_processing mode, which starts each worker through `/bin/sh -c`)."""
    procs = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            procs[int(proc.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"),
                                     (proc / "cmdline").read_bytes())
        except (OSError, IndexError, ValueError):
            continue
    return {pid: cpu for pid, (ppid, cpu, cmd) in procs.items()
            if b"sdk_worker" in cmd and not cmd.startswith(b"/bin/sh")
            and (ppid == parent or procs.get(ppid, (None,))[0] == parent)}


def watch_workers(parent: int, stop: threading.Event, seen: list[int], cpu: dict[int, float]) -> None:
    """Samples, until `stop`: how many workers are alive, and each one's CPU seconds (the last sample of each)."""
    while not stop.is_set():
        now = sdk_workers(parent)
        seen.append(len(now))
        cpu.update(now)
        stop.wait(0.5)


def write_bench_pairs(features: str, path: Path, n_pairs: int, per_image: int) -> int:
    """`n_pairs` (product text, image) pairs over n_pairs / per_image images, each image with its own product's
    text and random others (a re-rank's shape), as score-pairs' input. -> images used."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folders = open_feature_folders([features])
    texts = load_texts(folders)
    index = index_images(folders, texts)
    rng = np.random.default_rng(0)
    n_images = min(len(index), max(1, n_pairs // per_image))
    images = np.sort(rng.choice(len(index), n_images, replace=False))
    image_ids, product_ids = [], []
    for i in images:
        others = rng.choice(len(texts.product_ids), per_image - 1, replace=False)
        image_ids += [index.image_ids[i]] * per_image
        product_ids += [texts.product_ids[index.product[i]]] + [texts.product_ids[t] for t in others]
    pq.write_table(pa.table({"product_id": product_ids[:n_pairs], "image_id": image_ids[:n_pairs]}), path)
    return n_images


def bench_beam(tmp: Path, features: str, model: str, n_pairs: int, per_image: int, precision: str) -> dict:
    """score-pairs in this process, on the portable runner (one worker process), and on the FnApiRunner with 1 and 2
    worker processes -> pairs/s each."""
    from fashionbert.rank import score_pairs
    from pipelines import score_pairs as beam_score_pairs
    from pipelines import worker_pool

    print(f"\n== 4. cross-encoder through Beam (score-pairs' RunInference pipeline), {os.cpu_count()} cores ==")
    # Worker processes import this checkout's `pipelines` to unpickle the pipeline's steps.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    pairs = tmp / "bench-pairs.parquet"
    n_images = write_bench_pairs(features, pairs, n_pairs, per_image)
    print(f"{n_pairs} pairs over {n_images} images of {features}; model {model}; precision {precision}; "
          f"pairs/s = pairs / wall seconds of the whole stage (model loading and worker start-up included)")

    def config(out: str) -> score_pairs.ScorePairsConfig:
        # One torch thread per worker process, as a cluster's workers each bring their own cores: the 2-worker /
        # 1-worker ratio is then the scaling (2.0 ideal with a core each), 1-worker / in-process what Beam costs.
        return score_pairs.ScorePairsConfig(features=[features], model=model, pairs=str(pairs), out=str(tmp / out),
                                            device="cpu", precision=precision, num_threads=1, progress=False)

    def measured(label: str, run, parent: int | None = None) -> float:
        """pairs/s by wall time; also pairs per CPU-second (this process + its workers): on a machine other jobs
        share, the wall-time rates follow the CPU share the processes get, the CPU-second rate the work done."""
        seen: list[int] = []
        worker_cpu: dict[int, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=watch_workers, args=(parent or os.getpid(), stop, seen, worker_cpu),
                                   daemon=True)
        cpu0 = time.process_time()
        watcher.start()
        try:
            _, seconds = timed(run)
        finally:
            stop.set()
            watcher.join()
        cpu = time.process_time() - cpu0 + sum(worker_cpu.values())
        print(f"{label}: {seconds:.1f} s, {n_pairs / seconds:.1f} pairs/s; {cpu:.0f} CPU-s, {n_pairs / cpu:.1f} pairs "
              f"per CPU-s (most SDK worker processes alive at once: {max(seen, default=0)})")
        return n_pairs / seconds

    rates = {"in-process": measured("single process (score-pairs without Beam options), 1 torch thread",
                                    lambda: score_pairs.run(config("single.parquet")))}
    pool = worker_pool.start()
    try:
        # The embedded job server runs its FnApiRunner with one worker whatever --direct_num_workers says (Beam
        # 2.77's local_job_service does not pass the option on), so the pool serves this job one worker process.
        rates["portable-1"] = measured("PortableRunner (embedded job server, worker pool), 1 worker process",
                                       lambda: beam_score_pairs.run(config("portable.parquet"), pool.args),
                                       parent=pool.proc.pid)
    finally:
        pool.stop()
    for workers in (1, 2):
        # Worker processes the FnApiRunner starts itself (sdk_worker_main over gRPC; nothing shared in memory).
        args = ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
        rates[f"processes-{workers}"] = measured(
            f"FnApiRunner multi_processing, {workers} worker process(es) x 1 torch thread",
            lambda: beam_score_pairs.run(config(f"mp-{workers}.parquet"), args))
    print(f"scaling 1 -> 2 worker processes: {rates['processes-2'] / rates['processes-1']:.2f}x; portable 1 worker / "
          f"in-process: {rates['portable-1'] / rates['in-process']:.2f}x; 2 worker processes / in-process: "
          f"{rates['processes-2'] / rates['in-process']:.2f}x")
    print("pairs/s on one GPU: not measured (no GPU in this run)")
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--pairs", type=int, default=512, help="pairs in the throughput measurement")
    parser.add_argument("--catalog", type=int, default=5000, help="images = texts of the catalog estimate")
    parser.add_argument("--recall-k", type=int, default=100, help="recall-k of the catalog estimate")
    parser.add_argument("--gallery", type=int, default=1000, help="held-out products of the quality comparison")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps of the quality model")
    parser.add_argument("--quality-backbone", default="minilm",
                        help="backbone of the quality model: minilm (packaged, pretrained) or tiny (random, 2x64)")
    parser.add_argument("--quality-k", default="10,20,50,100", help="recall-k values compared in section 3")
    parser.add_argument("--timed-k", type=int, default=50, help="recall-k of the timed two-stage run in section 3")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip (1,2,3)")
    parser.add_argument("--beam-features", metavar="DIR", help="section 4: a featurize output (e.g. hm-dev's)")
    parser.add_argument("--beam-model", metavar="DIR", help="section 4: a model folder trained on those features")
    parser.add_argument("--beam-pairs", type=int, default=1280, help="section 4: pairs scored by each path")
    parser.add_argument("--beam-pairs-per-image", type=int, default=8, help="section 4: texts paired with each image")
    args = parser.parse_args()
    rt = resolve_runtime("auto", args.precision, args.threads)
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rates = None
        if "1" not in skip or "2" not in skip:
            rates = bench_throughput(tmp, rt, args.pairs)
        if "2" not in skip:
            bench_catalog(rates, args.catalog, args.recall_k, dim=rates["hidden"])
        if "3" not in skip:
            bench_quality(tmp, rt, args.gallery, args.train_steps, [int(k) for k in args.quality_k.split(",")],
                          args.timed_k, args.quality_backbone)
        if args.beam_features:
            bench_beam(tmp, args.beam_features, args.beam_model, args.beam_pairs, args.beam_pairs_per_image,
                       rt.precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
