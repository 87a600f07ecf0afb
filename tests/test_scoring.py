"""Cross-encoder scoring (factored embeddings equal the model's own forward; order; bf16), the dual encoder and
its contrastive loss, model loading with and without an itc head, score-pairs, and the no-faiss/no-Beam import
rule. Also the helpers the other scoring tests build their tiny trained models with."""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch

from fashionbert.data.batching import length_batches, pad_texts
from fashionbert.data.feature_catalog import ArrayImages, IndexedImages, open_catalog
from fashionbert.errors import UserError
from fashionbert.model.contrastive import ContrastiveHead, contrastive_loss, itc_loss
from fashionbert.model.loading import load_model
from fashionbert.model.score_fusion import ScoreFusion
from fashionbert.rank import score_pairs
from fashionbert.rank.cross_encoder import CrossEncoderScorer, probability
from fashionbert.rank.embeddings import DualEncoder
from fashionbert.runtime import resolve_runtime
from fashionbert.train.trainer import run as train_run
from schemas import read_table
from tests.fake_features import make_tiny_backbone, write_fake_features
from tests.test_train import assert_import_neither_beam_nor_faiss, make_args

torch.set_num_threads(1)
FEATURE_DIM = 16


# ============================================================================================ helpers (shared)
def train_tiny_model(tmp: Path, features: Path, backbone: Path, steps: int = 6, itc_dim: int = 0) -> Path:
    """A tiny FashionBERT trained for a few steps by `fashionbert train` itself -> its OUT/model (by default the
    paper's three tasks only, no itc head: the recall fallback must work for such models)."""
    out = tmp / "train-out"
    train_run(make_args(features, out, backbone, "--steps", steps, "--checkpoint-every", 0, "--prefetch", 0,
                        "--val-every", 0, "--itc-dim", itc_dim))
    return out / "model"


def fit_itc_head(model_dir: Path, features: Path, out: Path, steps: int = 40, dim: int = 32, seed: int = 0) -> Path:
    """Attach a ContrastiveHead to a trained three-task model and train the itc task alone for a few steps at a
    high rate (a recall stage good enough for the retrieval tests, in seconds), then save: the weights file then
    holds `itc_head.*` and config.json its size."""
    rt = resolve_runtime("cpu", "fp32")
    loaded = load_model(model_dir, rt)
    model = loaded.model
    torch.manual_seed(seed)
    model.itc_head = ContrastiveHead(model.config.hidden_size, dim)
    catalog = open_catalog([str(features)], loaded)
    feats = IndexedImages(catalog.index, catalog.reader).read(np.arange(len(catalog.index)))
    texts = catalog.text_ids
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        rows = rng.choice(len(catalog.index), size=16, replace=False)
        ids, mask = pad_texts([texts[p] for p in catalog.index.product[rows]], cfg.max_text_len, cfg.pad_token_id,
                              cfg.sep_token_id)
        loss = itc_loss(model, torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(feats[rows]).float(),
                        tia_labels=torch.ones(len(rows), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.config.itc_dim, model.config.itc_pooling = dim, "mean"
    model.save(out)
    return out


# ============================================================================================ fixtures
@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_fake_features(tmp_path_factory.mktemp("features"), n_products=30, images_per_product=2,
                               feature_dim=FEATURE_DIM, n_image_shards=2, row_group_size=8, extra_words=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, features, backbone):
    return train_tiny_model(tmp_path_factory.mktemp("model"), features, backbone)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir, resolve_runtime("cpu", "fp32"))


@pytest.fixture(scope="module")
def catalog(features, loaded):
    return open_catalog([str(features)], loaded)


# ============================================================================================ scorer
def _reference_margins(model, texts, feats, pairs):
    cfg = model.config
    ids, mask = pad_texts([texts[t] for t in pairs[:, 0]], cfg.max_text_len, cfg.pad_token_id, cfg.sep_token_id)
    with torch.no_grad():
        mask = torch.from_numpy(mask)
        seq, pooled = model.encode(torch.from_numpy(ids), mask, torch.from_numpy(feats[pairs[:, 1]]).float())
        logits = model.alignment_logits(seq, mask, pooled)
    return (logits[:, 1] - logits[:, 0]).numpy()


def test_scorer_matches_the_model_and_keeps_order(loaded, catalog):
    """Factored embeddings, image blocks, length-sorted batches: the same numbers as the model's own encode(),
    returned in the order asked, with repeats and texts of different lengths."""
    model = loaded.model
    rng = np.random.default_rng(0)
    texts = [t.copy() for t in catalog.text_ids]
    texts[0] = np.concatenate([texts[0][:-1], np.full(30, 2003), texts[0][-1:]])  # one long text
    feats = IndexedImages(catalog.index, catalog.reader).read(np.arange(len(catalog.index)))
    pairs = np.stack([rng.integers(0, len(texts), 200), rng.integers(0, len(feats), 200)], axis=1)
    pairs[:20] = pairs[0]  # repeats
    pairs[20:40, 0] = 0
    scorer = CrossEncoderScorer(model, resolve_runtime("cpu", "fp32"), token_budget=700, block_images=5)
    got = scorer.score(texts, ArrayImages(feats), pairs)
    ref = _reference_margins(model, texts, feats, pairs)
    assert got.dtype == np.float32 and got.shape == (200,)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    # repeats score alike; not always bit for bit: a row's place in a batch can move the last bit (GEMM blocking)
    np.testing.assert_allclose(got[:20], np.full(20, got[0]), rtol=0, atol=1e-6)
    # P(aligned) = softmax over the two logits = sigmoid(margin), as FashionBertModel.score gives it
    ids, mask = pad_texts([texts[t] for t in pairs[:8, 0]], 64, 0, 102)
    p = model.score(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(feats[pairs[:8, 1]]).float())
    np.testing.assert_allclose(probability(got[:8]), p.numpy(), atol=1e-6)
    # the same pairs through Parquet reads give the same scores
    again = CrossEncoderScorer(model, resolve_runtime("cpu", "fp32"), block_images=3).score(
        texts, IndexedImages(catalog.index, catalog.reader), pairs)
    np.testing.assert_allclose(again, got, atol=2e-5)
    assert scorer.score(texts, ArrayImages(feats), np.zeros((0, 2), dtype=np.int64)).shape == (0,)


def test_scorer_factored_pass_equals_encode_exactly(loaded, catalog):
    """Texts of one length, so no batch pads differently from the reference: the scorer's reuse of text and patch
    embeddings across pairs gives the margins of the model's own encode() to fp32 rounding. Not bit for bit: on
    AVX-512/AMX CPUs the fp32 matmul kernels block by batch shape, and the scorer's blocks differ from one
    reference batch (2e-8 apart on an Intel Xeon; equal on the AMD EPYC)."""
    model = loaded.model
    feats = IndexedImages(catalog.index, catalog.reader).read(np.arange(len(catalog.index)))
    texts = [np.asarray([101, 2000 + i, 2100 + i, 102]) for i in range(6)]
    pairs = np.stack([np.tile(np.arange(6), 5), np.repeat(np.arange(5), 6)], axis=1)
    scorer = CrossEncoderScorer(model, resolve_runtime("cpu", "fp32"), block_images=2)
    got = scorer.score(texts, ArrayImages(feats), pairs)
    ids = torch.from_numpy(np.stack([texts[t] for t in pairs[:, 0]]))
    with torch.no_grad():
        seq, pooled = model.encode(ids, torch.ones_like(ids), torch.from_numpy(feats[pairs[:, 1]]).float())
        ref = model.tia_margin(seq, torch.ones_like(ids), pooled).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_late_fusion_scorer_runs_the_lower_layers_once_per_item_and_matches_the_model(loaded, catalog):
    import copy

    late, single_stream = copy.deepcopy(loaded.model), copy.deepcopy(loaded.model)
    late.config.fusion_layer, single_stream.config.fusion_layer = 1, 0  # whatever the fixture trained with
    feats = IndexedImages(catalog.index, catalog.reader).read(np.arange(len(catalog.index)))
    rng = np.random.default_rng(1)
    pairs = np.stack([rng.integers(0, len(catalog.text_ids), 60), rng.integers(0, len(feats), 60)], axis=1)
    got = CrossEncoderScorer(late, resolve_runtime("cpu", "fp32"), token_budget=700, block_images=4).score(
        catalog.text_ids, ArrayImages(feats), pairs)
    np.testing.assert_allclose(got, _reference_margins(late, catalog.text_ids, feats, pairs), atol=2e-5)
    single = _reference_margins(single_stream, catalog.text_ids, feats, pairs)
    assert np.abs(got - single).max() > 1e-4  # the fusion layer matters (5x the match tolerance above)


@pytest.mark.parametrize("pooling", ["halves", "tokens"])
def test_agreement_tia_scorer_matches_the_model(backbone, catalog, pooling):
    """The "halves" and "tokens" TIA heads read the joint pass's text and patch states: the factored scorer (texts
    padded per batch, images in blocks) gives the model's own margins, and those are not the [CLS] classifier's
    alone."""
    from fashionbert.model.config import FashionBertConfig
    from fashionbert.model.modeling import FashionBertModel

    torch.manual_seed(0)
    model = FashionBertModel.from_pretrained_backbone(FashionBertConfig(
        backbone=str(backbone), feature_dim=FEATURE_DIM, itc_dim=8, tia_pooling=pooling, dropout=0.0)).eval()
    feats = IndexedImages(catalog.index, catalog.reader).read(np.arange(len(catalog.index)))
    rng = np.random.default_rng(2)
    pairs = np.stack([rng.integers(0, len(catalog.text_ids), 40), rng.integers(0, len(feats), 40)], axis=1)
    got = CrossEncoderScorer(model, resolve_runtime("cpu", "fp32"), token_budget=700, block_images=4).score(
        catalog.text_ids, ArrayImages(feats), pairs)
    np.testing.assert_allclose(got, _reference_margins(model, catalog.text_ids, feats, pairs), atol=2e-5)
    cfg = model.config
    ids, mask = pad_texts([catalog.text_ids[t] for t in pairs[:, 0]], cfg.max_text_len, cfg.pad_token_id,
                          cfg.sep_token_id)
    with torch.no_grad():
        _, pooled = model.encode(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(feats[pairs[:, 1]]).float())
        cls = model.tia_head(pooled)
    assert np.abs(got - (cls[:, 1] - cls[:, 0]).numpy()).max() > 1e-2


def test_training_validation_scores_pairs_as_the_scorer_and_the_model_do(backbone, catalog):
    """Training's validation (`quick_validation.head_scores`) runs the factored scorer retrieve and evaluate use:
    its margins are the model's own per pair, for a late-fusion model with an itc head, in each query's candidate
    order; its cosines are the dual encoder's; and a model in training mode is put back in training mode."""
    from fashionbert.evaluation.quick_validation import head_scores
    from fashionbert.evaluation.sample_hundred import SampleHundred
    from fashionbert.model.config import FashionBertConfig
    from fashionbert.model.modeling import FashionBertModel

    torch.manual_seed(0)
    model = FashionBertModel.from_pretrained_backbone(FashionBertConfig(
        backbone=str(backbone), feature_dim=FEATURE_DIM, itc_dim=8, fusion_layer=1, dropout=0.1))
    feats = IndexedImages(catalog.index, catalog.reader).read(np.arange(len(catalog.index)))
    rng = np.random.default_rng(3)
    candidates = [rng.permutation(len(feats))[:n] for n in (5, 1, 7)]
    s100 = SampleHundred(query_products=np.arange(3), candidates=candidates, pool_products=np.arange(len(feats)),
                         pool_features=feats, texts=[catalog.text_ids[i] for i in (0, 3, 1)])
    rt = resolve_runtime("cpu", "fp32")
    model.train()
    margins, cosines = head_scores(model, s100, model.config, rt)
    assert model.training
    model.eval()
    pairs = np.asarray([(q, c) for q, cs in enumerate(candidates) for c in cs])
    np.testing.assert_allclose(margins, _reference_margins(model, s100.texts, feats, pairs), atol=2e-5)
    dual = DualEncoder(model, torch.device("cpu"))
    expected = np.einsum("nd,nd->n", dual.embed_texts(s100.texts)[pairs[:, 0]], dual.embed_images([feats])[pairs[:, 1]])
    np.testing.assert_allclose(cosines, expected, atol=1e-6)
    assert margins.dtype == cosines.dtype == np.float64 and len(margins) == 13


def _cli_and_auto_margins(folder: Path, catalog) -> tuple[np.ndarray, np.ndarray]:
    import fashionbert  # noqa: F401  (registers the model type with transformers)
    from transformers import AutoModel

    feats = IndexedImages(catalog.index, catalog.reader).read(np.arange(len(catalog.index)))
    pairs = np.stack([np.arange(30), np.arange(0, 60, 2)], axis=1)
    rt = resolve_runtime("cpu", "fp32")
    cli = CrossEncoderScorer(load_model(folder, rt).model, rt).score(catalog.text_ids, ArrayImages(feats), pairs)
    auto = AutoModel.from_pretrained(folder)
    assert not auto.training
    return cli, CrossEncoderScorer(auto, rt).score(catalog.text_ids, ArrayImages(feats), pairs)


def test_auto_model_from_a_training_folder_scores_like_the_cli(model_dir, catalog):
    cli, auto = _cli_and_auto_margins(model_dir, catalog)
    np.testing.assert_array_equal(auto, cli)


def test_a_folder_written_before_the_transformers_classes_loads(tmp_path, model_dir, catalog):
    """7c0cff2 wrote config.json as the dataclass's fields plus model_type and format_version, nothing of
    transformers' own keys; such a folder loads through both paths with the same scores."""
    import dataclasses

    from transformers import PreTrainedConfig

    from fashionbert.model.config import FashionBertConfig

    old = tmp_path / "old-model"
    shutil.copytree(model_dir, old)
    cfg = json.loads((old / "config.json").read_text())
    own = {f.name for f in dataclasses.fields(FashionBertConfig)} - {f.name for f in dataclasses.fields(PreTrainedConfig)}
    (old / "config.json").write_text(json.dumps({"model_type": "fashionbert", **{k: cfg[k] for k in own}}, indent=2,
                                                sort_keys=True))
    assert "transformers_version" not in (old / "config.json").read_text()
    cli, auto = _cli_and_auto_margins(old, catalog)
    np.testing.assert_array_equal(auto, _cli_and_auto_margins(model_dir, catalog)[0])
    np.testing.assert_array_equal(auto, cli)


def test_bf16_scores_close_to_fp32(loaded, catalog):
    feats = IndexedImages(catalog.index, catalog.reader).read(np.arange(len(catalog.index)))
    pairs = np.stack([np.arange(30), np.arange(0, 60, 2)], axis=1)
    fp32 = CrossEncoderScorer(loaded.model, resolve_runtime("cpu", "fp32")).score(catalog.text_ids, ArrayImages(feats), pairs)
    bf16 = CrossEncoderScorer(loaded.model, resolve_runtime("cpu", "bf16")).score(catalog.text_ids, ArrayImages(feats), pairs)
    assert np.abs(probability(fp32) - probability(bf16)).max() < 0.02


def test_length_batches_pad_little_and_respect_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 65, size=1000)
    order = np.argsort(lengths, kind="stable")
    batches = list(length_batches(order, lengths, token_budget=4096, max_rows=512, extra_tokens=64))
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(1000))
    padded = sum(len(b) * (lengths[b].max() + 64) for b in batches)
    real = int((lengths + 64).sum())
    assert padded / real < 1.05  # vs ~1.4 for random batches of this spread
    assert all(len(b) * (lengths[b].max() + 64) <= 4096 for b in batches)


# ============================================================================================ dual encoder
def test_contrastive_loss_hand_computed():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    i = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = 2.0
    logits = scale * (t @ i.t())
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(2)) +
                      torch.nn.functional.cross_entropy(logits.t(), torch.arange(2)))
    row0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2)))
    assert float(contrastive_loss(t, i, scale)) == pytest.approx(float(expected), abs=1e-6)
    assert float(torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0]))) == pytest.approx(row0, abs=1e-6)
    # rows of one product are not each other's negatives: with both rows one group, each term is log(1) = 0
    assert float(contrastive_loss(t, i, scale, groups=torch.tensor([0, 0]))) == pytest.approx(0.0, abs=1e-6)


def test_itc_loss_trains_head_and_backbone_and_ignores_negatives(loaded, catalog):
    model = loaded.model
    head = ContrastiveHead(model.config.hidden_size, 8)
    model.itc_head = head
    try:
        feats = torch.from_numpy(IndexedImages(catalog.index, catalog.reader).read(np.arange(6))).float()
        texts = [catalog.text_ids[p] for p in catalog.index.product[:6]]
        ids, mask = pad_texts(texts, 64, 0, 102)
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        labels = torch.tensor([1, 1, 1, 1, 0, 0])
        loss = itc_loss(model, ids, mask, feats, tia_labels=labels)
        loss.backward()
        assert head.text_proj.weight.grad is not None and head.logit_scale.grad is not None
        assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None
        assert model.patch_embeddings.projection.weight.grad is not None
        model.zero_grad(set_to_none=True)
        # the negative rows (tia label 0) do not take part, whatever they hold
        ids2 = ids.clone()
        ids2[4:, 1:3] = 2500
        same = itc_loss(model, ids2, mask, feats, tia_labels=labels)
        assert float(same.detach()) == pytest.approx(float(loss.detach()), abs=1e-6)
        # MLM-masked tokens are put back from the labels before the text-only pass
        masked, mlm = ids.clone(), torch.full_like(ids, -100)
        mlm[:, 1] = ids[:, 1]
        masked[:, 1] = 103
        assert float(itc_loss(model, masked, mask, feats, labels, mlm).detach()) == pytest.approx(float(loss.detach()), abs=1e-6)
    finally:
        del model.itc_head
        model.zero_grad(set_to_none=True)


def test_cls_pooling_head_embeds():
    head = ContrastiveHead(64, 8, pooling="cls")
    again = ContrastiveHead.from_state_dict({"itc_head." + k: v for k, v in head.state_dict().items()})
    assert again.pooling == "cls" and again.dim == 8
    with pytest.raises(ValueError):
        ContrastiveHead(64, 8, pooling="max")


def test_itc_head_saved_and_loaded_with_the_model(tmp_path, model_dir, features, catalog):
    out = fit_itc_head(model_dir, features, tmp_path / "with-itc", steps=3)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert any(k.startswith("itc_head.") for k in f.keys())
    rt = resolve_runtime("cpu", "fp32")
    with_head = load_model(out, rt)
    assert with_head.has_itc_head and with_head.version != load_model(model_dir, rt).version
    dual = DualEncoder(with_head.model, rt.device)
    assert dual.trained and "itc_head" in dual.description
    vec = dual.embed_texts(catalog.text_ids[:5])
    assert vec.shape == (5, 32) and np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    img = dual.embed_images([IndexedImages(catalog.index, catalog.reader).read(np.arange(4))])
    assert img.shape == (4, 32)
    # without a head: the backbone fallback, hidden-size vectors, and it says so
    plain = DualEncoder(load_model(model_dir, rt).model, rt.device)
    assert not plain.trained and "fallback" in plain.description
    assert plain.embed_texts(catalog.text_ids[:3]).shape == (3, 64)
    # the batched text embedding equals one-at-a-time (length bucketing does not change the numbers)
    one = np.concatenate([dual.embed_texts([t]) for t in catalog.text_ids[:5]])
    np.testing.assert_allclose(vec, one, atol=1e-5)


def test_load_model_errors_name_the_folder(tmp_path):
    rt = resolve_runtime("cpu", "fp32")
    with pytest.raises(UserError, match="no such folder"):
        load_model(tmp_path / "nope", rt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        load_model(tmp_path / "empty", rt)


def test_load_model_refuses_damaged_weights_in_one_line(tmp_path, model_dir):
    damaged = tmp_path / "model"
    shutil.copytree(model_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # a copy cut short
    with pytest.raises(UserError, match="cannot read model.safetensors .* copy the model folder again") as err:
        load_model(damaged, resolve_runtime("cpu", "fp32"))
    assert "\n" not in str(err.value)


# ============================================================================================ score-pairs
def _score_args(*argv) -> score_pairs.ScorePairsConfig:
    parser = argparse.ArgumentParser()
    score_pairs.add_arguments(parser)
    return score_pairs.config_from_args(parser.parse_args([*map(str, argv), "--device", "cpu", "--precision", "fp32"]))


def test_model_from_before_the_colour_statistics_is_refused_with_the_fix(tmp_path, loaded):
    # Features 6 wider than the model's: the one mismatch an upgrade creates, so its message says what to do.
    wider = write_fake_features(tmp_path / "wider", n_products=4, feature_dim=FEATURE_DIM + 6, n_image_shards=1)
    with pytest.raises(UserError, match="before featurize added 6 colour statistics.*train a model on these"):
        open_catalog([str(wider)], loaded)
    other = write_fake_features(tmp_path / "other", n_products=4, feature_dim=FEATURE_DIM + 1, n_image_shards=1)
    with pytest.raises(UserError, match="use a model trained on these features"):
        open_catalog([str(other)], loaded)


def test_score_pairs_keeps_rows_order_and_extra_columns(tmp_path, features, model_dir, loaded, catalog):
    pairs = pa.table({
        "note": ["a", "b", "c", "d", "e", "f"],
        "image_id": ["p00003-1", "p00000-0", "nope-0", "p00003-1", "p00007-0", None],
        "product_id": ["p00003", "p00005", "p00001", "p00003", "zzz", "p00002"],
        "weight": [1.5, 2.5, 3.5, 4.5, 5.5, 6.5],
    })
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    summary = score_pairs.run(_score_args("--features", features, "--model", model_dir, "--pairs",
                                          tmp_path / "pairs.parquet", "--out", tmp_path / "scored.parquet"))
    out = pq.read_table(tmp_path / "scored.parquet")
    assert out.column_names == ["note", "image_id", "product_id", "weight", "score"]
    assert out.schema.field("score").type == pa.float32()
    assert out.column("note").to_pylist() == ["a", "b", "d"]
    assert out.column("weight").to_pylist() == [1.5, 2.5, 4.5]
    s = out.column("score").to_numpy()
    assert s[0] == s[2] and np.all((s > 0) & (s < 1))
    # the score is the model's P(aligned) for that (text, image)
    t, i = catalog.texts.index["p00005"], catalog.index.image_ids.index("p00000-0")
    feats = IndexedImages(catalog.index, catalog.reader).read(np.array([i]))
    ref = probability(_reference_margins(loaded.model, catalog.text_ids, feats, np.array([[t, 0]])))
    assert s[1] == pytest.approx(float(ref[0]), abs=1e-5)
    rejects = read_table(str(tmp_path / "scored.rejects.parquet"), "pair_rejects").to_pydict()
    assert rejects["row"] == [2, 4, 5]
    assert rejects["reason"] == ["unknown_image_id", "unknown_product_id", "missing_image_id"]
    assert summary["pairs"] == 6 == summary["scored"] + summary["rejected"]


def test_score_pairs_gives_the_fused_ranking_score(tmp_path, features, model_dir, catalog):
    model = fit_itc_head(model_dir, features, tmp_path / "with-itc", steps=3)
    ScoreFusion(0.5, 4.0, -1.0, {"source": "test"}).save(model)
    pairs = pa.table({"product_id": ["p00003", "p00005", "p00001"], "image_id": ["p00003-1", "p00000-0", "p00009-1"]})
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    summary = score_pairs.run(_score_args("--features", features, "--model", model, "--pairs", tmp_path / "pairs.parquet",
                                          "--out", tmp_path / "scored.parquet"))
    assert "itc cosine" in summary["ranking_score"] and "-s" in summary["model_version"]
    got = pq.read_table(tmp_path / "scored.parquet").column("score").to_numpy()
    loaded = load_model(model, resolve_runtime("cpu", "fp32"))
    t = np.array([catalog.texts.index[p] for p in pairs.column("product_id").to_pylist()])
    i = np.array([catalog.index.image_ids.index(x) for x in pairs.column("image_id").to_pylist()])
    feats = IndexedImages(catalog.index, catalog.reader).read(i)
    margin = _reference_margins(loaded.model, catalog.text_ids, feats, np.stack([t, np.arange(3)], axis=1))
    dual = DualEncoder(loaded.model, torch.device("cpu"))
    cos = (dual.embed_texts([catalog.text_ids[x] for x in t]) * dual.embed_images([feats])).sum(axis=1)
    np.testing.assert_allclose(got, probability(0.5 * margin + 4.0 * cos - 1.0), atol=1e-5)


def test_score_pairs_csv_with_numeric_looking_ids(tmp_path, features, model_dir):
    folder = tmp_path / "numeric"
    # Product ids that look like integers (as H&M's article ids do) must still match the features' strings.
    shutil.copytree(features, folder)
    for shard in folder.glob("texts-*.parquet"):
        t = pq.read_table(shard)
        ids = [pid.replace("p", "0") for pid in t.column("product_id").to_pylist()]
        t = t.set_column(0, t.schema.field("product_id"), pa.array(ids, pa.string()))
        pq.write_table(t.replace_schema_metadata(pq.read_schema(shard).metadata), shard)
    for shard in folder.glob("images-*.parquet"):
        t = pq.read_table(shard)
        ids = [pid.replace("p", "0") for pid in t.column("product_id").to_pylist()]
        t = t.set_column(1, t.schema.field("product_id"), pa.array(ids, pa.string()))
        pq.write_table(t.replace_schema_metadata(pq.read_schema(shard).metadata), shard)
    (tmp_path / "pairs.csv").write_text("product_id,image_id,extra\n000004,p00004-0,x\n000012,p00004-1,y\n")
    score_pairs.run(_score_args("--features", folder, "--model", model_dir, "--pairs", tmp_path / "pairs.csv",
                                "--out", tmp_path / "scored.csv"))
    out = pcsv.read_csv(tmp_path / "scored.csv", convert_options=pcsv.ConvertOptions(column_types={"product_id": pa.string()}))
    assert out.column("product_id").to_pylist() == ["000004", "000012"]
    assert out.column("extra").to_pylist() == ["x", "y"] and out.num_rows == 2


def test_score_pairs_user_errors(tmp_path, features, model_dir):
    pq.write_table(pa.table({"product": ["p1"], "image_id": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"column\(s\) \['product_id'\] not found"):
        score_pairs.run(_score_args("--features", features, "--model", model_dir, "--pairs", tmp_path / "bad.parquet",
                                    "--out", tmp_path / "o.parquet"))
    with pytest.raises(UserError, match="unknown file type"):
        score_pairs.run(_score_args("--features", features, "--model", model_dir, "--pairs", tmp_path / "bad.parquet",
                                    "--out", tmp_path / "o.txt"))
    with pytest.raises(UserError, match="no such file"):
        score_pairs.run(_score_args("--features", features, "--model", model_dir, "--pairs", tmp_path / "none.csv",
                                    "--out", tmp_path / "o.csv"))


def test_scoring_modules_import_neither_beam_nor_faiss():
    assert_import_neither_beam_nor_faiss("fashionbert.rank.cross_encoder", "fashionbert.model.contrastive", "fashionbert.rank.embeddings", "fashionbert.model.loading", "fashionbert.data.feature_catalog", "fashionbert.runtime", "fashionbert.rank.score_pairs",
                                         "fashionbert.evaluation.evaluate", "fashionbert.rank.retrieve", "fashionbert.evaluation.report",
                                         "fashionbert.rank.neighbours", "fashionbert.evaluation.fit_fusion", "fashionbert.model.score_fusion",
                                         "fashionbert.rank.score_cache", "fashionbert.model.attention",
                                         "fashionbert.evaluation.explain", "fashionbert.evaluation.report_attention",
                                         "fashionbert.evaluation.heatmaps")


def test_help_explains_the_options():
    parser = argparse.ArgumentParser()
    score_pairs.add_arguments(parser)
    text = parser.format_help()
    for opt in ("--features", "--model", "--pairs", "--out", "--rejects", "--device", "--precision", "--batch-tokens"):
        assert opt in text
