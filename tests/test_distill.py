"""fashionbert distill: the student starts as the chosen teacher layers, distillation brings it closer to the teacher
on held-out pairs, its folder is an ordinary model folder (load_model, AutoModel, score-pairs), --resume continues
exactly, and bad options are refused with one clear message."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fashionbert.data.feature_catalog import ArrayImages
from fashionbert.data.features import FeatureReader
from fashionbert.errors import UserError
from fashionbert.evaluation.sample_hundred import build_sample_hundred
from fashionbert.model.loading import load_model
from fashionbert.model.modeling import FashionBertModel
from fashionbert.model.score_fusion import FUSION_NAME
from fashionbert.rank.cross_encoder import CrossEncoderScorer
from fashionbert.runtime import resolve_runtime
from fashionbert.train import distill
from fashionbert.train.distill import DistillConfig, build_student, chosen_layers
from fashionbert.train.state import load_data
from fashionbert.train.trainer import TrainConfig, run as train
from tests.fake_features import make_tiny_backbone, write_fake_features

torch.set_num_threads(1)
FEATURE_DIM = 16


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_fake_features(tmp_path_factory.mktemp("features"), n_products=40, images_per_product=2,
                               feature_dim=FEATURE_DIM, n_image_shards=2, row_group_size=8, noise=0.05)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, features):
    """A 3-layer teacher with the itc head and the halves TIA head, trained briefly by `fashionbert train`."""
    tmp = tmp_path_factory.mktemp("teacher")
    backbone = make_tiny_backbone(tmp / "bert", layers=3)
    train(TrainConfig(features=[str(features)], out=str(tmp / "run"), backbone=str(backbone), steps=60, batch_size=8,
                      lr=3e-3, itc_dim=16, val_fraction=0.25, val_queries=8, checkpoint_every=0, progress=False,
                      num_threads=1))
    return tmp / "run" / "model"


def config(teacher_dir, out, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher_dir), layers=2, out=str(out), steps=4, batch_size=8, lr=1e-3, val_queries=8,
                checkpoint_every=0, progress=False, num_threads=1)
    return DistillConfig(**{**base, **kw})


def test_teacher_layers_are_the_last_of_equal_blocks():
    assert chosen_layers(6, 3) == [1, 3, 5]
    assert chosen_layers(6, 2) == [2, 5]
    assert chosen_layers(6, 1) == [5]
    assert chosen_layers(12, 4) == [2, 5, 8, 11]
    assert chosen_layers(3, 2) == [0, 2]


def test_student_layers_equal_the_chosen_teacher_layers_before_training(teacher_dir):
    teacher = FashionBertModel.from_checkpoint(teacher_dir)
    student = build_student(teacher, 2)
    assert student.config.bert["num_hidden_layers"] == 2 and len(student.bert.encoder.layer) == 2
    assert teacher.config.bert["num_hidden_layers"] == 3  # the teacher's config is not touched
    for k, i in enumerate(chosen_layers(3, 2)):
        ours, theirs = student.bert.encoder.layer[k].state_dict(), teacher.bert.encoder.layer[i].state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    teacher_state = teacher.state_dict()
    rest = {n: p for n, p in student.state_dict().items() if not n.startswith("bert.encoder.layer.")}
    assert {"itc_head.text_proj.weight", "tia_head.agreement_scale", "patch_embeddings.projection.weight"} <= set(rest)
    assert all(torch.equal(p, teacher_state[n]) for n, p in rest.items())


def test_a_late_fusion_teacher_gives_a_student_that_fuses_where_its_layers_did(teacher_dir):
    teacher = FashionBertModel.from_checkpoint(teacher_dir)
    teacher.config.fusion_layer = 2  # layers 0 and 1 unimodal, layer 2 joint
    assert build_student(teacher, 2).config.fusion_layer == 1  # from layers [0, 2]: 0 stays unimodal
    assert build_student(teacher, 1).config.fusion_layer == 0  # from layer [2]: joint


def _held_out(cfg: DistillConfig, teacher):
    data = load_data(distill.resolve(cfg, teacher), 1)
    reader = FeatureReader(data.index.shards, teacher.config.num_patches, teacher.config.feature_dim)
    return build_sample_hundred(data.texts, data.index, data.val_rows, reader, queries=8, max_pool=40, seed=3)


def test_distillation_lowers_the_divergence_on_held_out_pairs(tmp_path, teacher_dir):
    cfg = config(teacher_dir, tmp_path / "out", layers=1, steps=40, lr=3e-4, warmup=5)
    teacher = distill.load_teacher(str(teacher_dir))
    s100 = _held_out(cfg, teacher)
    rt = resolve_runtime("cpu", "fp32", 1)
    before = distill.held_out_divergence(teacher, build_student(teacher, 1).eval(), s100, rt, cfg.temperature)
    summary = distill.run(cfg)
    student = FashionBertModel.from_checkpoint(summary["model_dir"])
    after = distill.held_out_divergence(teacher, student, s100, rt, cfg.temperature)
    assert after < 0.8 * before, (before, after)  # measured: 0.084 -> 0.059
    assert summary["teacher_layers"] == [2]
    records = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert len(train_records) == 40 and {"loss_kd_tia", "loss_kd_itc", "loss_kd_emb"} <= set(train_records[0])
    assert (tmp_path / "out" / "training_curves.png").is_file()


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, teacher_dir):
    out = tmp_path_factory.mktemp("student") / "out"
    return out, distill.run(config(teacher_dir, out, steps=4, checkpoint_every=2))


def test_the_student_folder_is_an_ordinary_model_folder(tmp_path, student_run, teacher_dir, features):
    out, summary = student_run
    folder = Path(summary["model_dir"])
    assert folder == out / "model" and (folder / FUSION_NAME).is_file()
    assert json.loads((folder / FUSION_NAME).read_text())["fitted"]["source"] == "training validation"
    # the held-out split is the teacher's
    options = json.loads((out / "checkpoints" / "step-0000004" / "training_state.json").read_text())["options"]
    assert options["val_fraction"] == 0.25 and options["teacher"] == str(teacher_dir)
    rt = resolve_runtime("cpu", "fp32", 1)
    loaded = load_model(folder, rt)
    assert loaded.config.bert["num_hidden_layers"] == 2 and loaded.step == 4
    import fashionbert  # noqa: F401  (registers the model type with transformers)
    from transformers import AutoModel

    auto = AutoModel.from_pretrained(folder)
    rng = np.random.default_rng(0)
    text_ids = [[101, *rng.integers(1000, 2000, 6).tolist(), 102] for _ in range(5)]
    feats = rng.standard_normal((3, 64, FEATURE_DIM)).astype(np.float32)
    pairs = np.array([[0, 0], [1, 2], [4, 1]])
    ours = CrossEncoderScorer(loaded.model, rt).score(text_ids, ArrayImages(feats), pairs)
    np.testing.assert_array_equal(CrossEncoderScorer(auto, rt).score(text_ids, ArrayImages(feats), pairs), ours)
    # `fashionbert score-pairs --model` on it
    from fashionbert.rank import score_pairs

    pq.write_table(pa.table({"product_id": ["p00003", "p00005"], "image_id": ["p00003-1", "p00000-0"]}),
                   tmp_path / "pairs.parquet")
    result = score_pairs.run(score_pairs.ScorePairsConfig(features=[str(features)], model=str(folder),
                                                          pairs=str(tmp_path / "pairs.parquet"),
                                                          out=str(tmp_path / "scored.parquet"), device="cpu"))
    assert result["scored"] == 2 and "itc cosine" in result["ranking_score"]


def test_resume_continues_exactly(tmp_path, student_run, teacher_dir):
    ref_out, _ = student_run
    out = tmp_path / "cut"

    def cut_at_2(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill.run(config(teacher_dir, out, steps=4, checkpoint_every=2), on_step=cut_at_2)
    with pytest.raises(UserError, match="--layers 1 .*checkpoint: 2"):
        distill.run(config(teacher_dir, out, steps=4, checkpoint_every=2, layers=1, resume=True))
    summary = distill.run(config(teacher_dir, out, steps=4, checkpoint_every=2, resume=True))
    assert summary["resumed_from"].endswith("step-0000002")
    from safetensors.torch import load_file

    a, b = load_file(ref_out / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_options_are_refused_with_one_clear_message(tmp_path, teacher_dir):
    with pytest.raises(UserError, match="--layers 3: .*fewer than the teacher's 3"):
        distill.run(config(teacher_dir, tmp_path / "a", layers=3))
    with pytest.raises(UserError, match="--layers 0: .*at least 1"):
        distill.run(config(teacher_dir, tmp_path / "b", layers=0))
    with pytest.raises(UserError, match="--teacher .*no such folder"):
        distill.run(config(tmp_path / "missing", tmp_path / "c"))
    with pytest.raises(UserError, match="--teacher .*no config.json"):
        (tmp_path / "empty").mkdir()
        distill.run(config(tmp_path / "empty", tmp_path / "d"))
    from fashionbert.commands.cli import main

    assert main(["distill", "--teacher", str(tmp_path / "missing"), "--layers", "1", "--out", str(tmp_path / "e")]) == 2
