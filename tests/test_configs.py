"""Typed stage configs: each stage's parser fills its dataclass, with the dataclass's defaults; nightly builds its
stages' configs (the pass-through strings parsed once, by each stage's own parser) and runs them without argv."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os

import pytest

from fashionbert.commands import nightly
from fashionbert.evaluation.evaluate import EvaluateConfig
from fashionbert.rank.retrieve import RetrieveConfig
from fashionbert.train.config import TrainConfig

# stage: (module with add_arguments and config_from_args, its required options and their parsed values)
STAGES = {
    "synth": ("fashionbert.commands.synth", {"out": "O"}),
    "train": ("fashionbert.train.config", {"features": ["F"], "out": "O"}),
    "fuse": ("fashionbert.evaluation.fit_fusion", {"features": ["F"], "model": "M"}),
    "score-pairs": ("fashionbert.rank.score_pairs", {"features": ["F"], "model": "M", "pairs": "P", "out": "O"}),
    "evaluate": ("fashionbert.evaluation.evaluate", {"features": ["F"], "model": "M", "out": "O"}),
    "retrieve": ("fashionbert.rank.retrieve", {"features": ["F"], "model": "M", "out": "O"}),
    "report": ("fashionbert.evaluation.report", {"retrieval": "R", "out": "O"}),
    "explain": ("fashionbert.evaluation.explain", {"features": ["F"], "model": "M", "pairs": "P", "out": "O"}),
    "demo": ("fashionbert.commands.demo", {}),
}


def _argv(required: dict) -> list[str]:
    return [arg for name, value in required.items()
            for arg in (f"--{name}", value[0] if isinstance(value, list) else value)]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_parser_defaults_are_the_config_defaults(stage):
    module_name, required = STAGES[stage]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(_argv(required))
    config = module.config_from_args(args)
    assert config == type(config)(**required)
    # Every option lands in a field and every field is an option: nothing parsed is dropped on the way.
    assert set(vars(args)) == {f.name for f in dataclasses.fields(config)}


def _nightly_config(tmp_path, *extra, from_scratch=False) -> nightly.NightlyConfig:
    parser = argparse.ArgumentParser()
    nightly.add_arguments(parser)
    args, beam_args = parser.parse_known_args(["--catalog", "synthetic:4", "--workdir", str(tmp_path / "work"),
                                               *extra])
    return nightly.config_from_args(args, beam_args, from_scratch)


def test_nightly_parses_pass_through_options_into_stage_configs(tmp_path):
    config = _nightly_config(tmp_path, "--train", "--backbone", "bert-dir", "--no-progress", "--top-k", "7",
                             "--recall-k", "9", "--train-args", "--steps 4 --keep-checkpoints 2",
                             "--retrieve-args", "--index flat", "--eval-args", "--queries 7",
                             "--direct_num_workers", "2")
    assert config.train == TrainConfig(features=["FEATURES"], out="OUT", backbone="bert-dir", progress=False, steps=4,
                                       keep_checkpoints=2)  # the user's --keep-checkpoints wins over nightly's
    # --no-progress reaches every stage (log lines instead of bars)
    assert config.retrieve == RetrieveConfig(features=["FEATURES"], model="MODEL", out="OUT", top_k=7, recall_k=9,
                                             index="flat", progress=False)
    assert config.evaluate == EvaluateConfig(features=["FEATURES"], model="MODEL", out="OUT", progress=False,
                                             **{**nightly.EVAL_DEFAULTS, "queries": 7})
    assert config.featurize.catalog == "synthetic:4" and config.featurize.backbone == "bert-dir"
    assert config.beam_args == ["--direct_num_workers", "2"] and config.train_args == ["--steps", "4",
                                                                                     "--keep-checkpoints", "2"]
    plain = _nightly_config(tmp_path, "--model", "m", "--skip-evaluate")
    assert plain.train is None and plain.evaluate is None and plain.model == "m"
    assert plain.retrieve.top_k == nightly.DEFAULT_TOP_K and plain.retrieve.recall_k == nightly.DEFAULT_RECALL_K


def test_nightly_runs_its_stages_on_configs_without_argv(tmp_path, monkeypatch):
    """Each stage gets its config completed with the run's folders, model and id; no argv is parsed on the way."""
    from fashionbert.evaluation import evaluate
    from fashionbert.rank import retrieve
    from fashionbert.train import trainer
    from pipelines import featurize

    config = _nightly_config(tmp_path, "--train", "--train-args", "--steps 4", "--top-k", "2", "--recall-k", "3")

    def no_argv(*args, **kwargs):
        raise AssertionError("a stage's options were parsed from argv during the run")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", no_argv)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", no_argv)
    seen = {}
    images = {"computed": 4, "carried": 0, "deleted": 0}
    counts = {"input_rows": 4, "accepted_images": 4, "texts": 4, "rejected_rows": 0, "rejects_by_stage_reason": {},
              "images": images, "text_rows": images}
    cache_counts = {"pairs_scored": 12, "pairs_reused": 0, "embeddings_computed": 8, "embeddings_reused": 0}
    table_counts = {"text_queries": 4, "image_queries": 4, "text_to_image_rows": 8, "image_to_text_rows": 8,
                    "cross_encoder_pairs": 12, **cache_counts}
    cache = {"inputs": [], "saved": "x"}

    def fake(name, result):
        def run(cfg, *beam_args):
            seen[name] = cfg
            return result
        return run

    monkeypatch.setattr(featurize, "run", fake("featurize", {"counts": counts, "elapsed_s": 1.0}))
    monkeypatch.setattr(trainer, "run", fake("train", {"model_dir": str(tmp_path / "m"), "final_step": 4,
                                                       "train_images": 4, "validation_images": 0, "validation": {}}))
    monkeypatch.setattr(retrieve, "run", fake("retrieve", {"model": {"version": "v1"}, "counts": table_counts,
                                                           "options": {}, "index_used": "flat", "seconds": {},
                                                           "score_cache": cache}))
    monkeypatch.setattr(evaluate, "run", fake("evaluate", {"split": {"kind": "all"},
                                                           "score_cache": {**cache_counts, **cache}}))
    summary = nightly.run(config)

    run_dir = os.path.join(os.path.abspath(config.workdir), "runs", summary["run_id"])
    features = os.path.join(run_dir, "features")
    assert summary["status"] == "ok" and summary["counts"]["text_to_image_rows"] == 8
    assert seen["featurize"] == dataclasses.replace(config.featurize, out=features)
    assert seen["train"] == dataclasses.replace(config.train, features=[features], out=os.path.join(run_dir, "train"))
    model = os.path.realpath(tmp_path / "m")
    # no latest run: no score cache to read; each stage saves its own
    caches = os.path.join(run_dir, nightly.SCORE_CACHE_DIR)
    assert seen["retrieve"] == dataclasses.replace(config.retrieve, features=[features], model=model,
                                                   out=os.path.join(run_dir, "retrieval"), run_id=summary["run_id"],
                                                   save_scores=os.path.join(caches, "retrieve.parquet"))
    assert seen["evaluate"] == dataclasses.replace(config.evaluate, features=[features], model=model,
                                                   out=os.path.join(run_dir, "metrics.json"),
                                                   save_scores=os.path.join(caches, "evaluate.parquet"))
    assert summary["counts"]["pairs_scored"] == 24 and summary["counts"]["embeddings_computed"] == 16
    assert summary["options"]["train_args"] == ["--steps", "4"]
    assert summary["stages"]["evaluate"]["argv"] == ["--queries", "100", "--draws", "1", "--gallery-max", "100",
                                                     "--recall-k", "20", "--draw-by", "product-id"]


def test_featurize_names_the_patch_cnns_there_are():
    # pipelines.config lists them without importing torch; the list must not drift from the weights' table
    from fashionbert.model.patch_cnn import CNNS
    from pipelines.config import CNN_NAMES

    assert CNN_NAMES == tuple(CNNS)
