"""bench/quality.py: its table and summary from metrics, --train-args read by train's parser over the README recipe,
and one end-to-end run (featurize a tiny synthetic catalog, train a tiny model, evaluate, table, summary)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from bench import quality
from fashionbert.errors import UserError


def _metrics(score_t2i: float, with_itc: bool = True) -> dict:
    """An evaluate metrics dict with only what the table reads."""
    def ranks(r1):
        return {d: {f"rank{k}": {"mean": r1 * k ** 0.5} for k in (1, 5, 10)} for d in ("t2i", "i2t")}

    by_head = {"tia": ranks(0.15), **({"itc": ranks(0.3)} if with_itc else {})}
    gallery = {key: {d: {f"rank{k}": r1 * k ** 0.5 for k in (1, 5, 10)} for d in ("t2i", "i2t")}
               for key, r1 in (("two_stage", 0.12), ("recall_only", 0.1))}
    variants = {"queries_with_variant": {"mean": 0.4}, "score": {"t2i": {"mean": 0.1}, "i2t": {"mean": 0.12}},
                "tia": {"t2i": {"mean": 0.2}, "i2t": {"mean": 0.22}}, **({"itc": {"t2i": {"mean": 0.05},
                                                                             "i2t": {"mean": 0.06}}} if with_itc else {})}
    heads = {"heads_correlation": {"t2i": {"mean": 0.991}, "i2t": {"mean": 0.987}},
             "either_head_rank1": {"t2i": {"mean": 0.427}, "i2t": {"mean": 0.453}}} if with_itc else {}
    return {"sample100": {**ranks(score_t2i), "by_head": by_head, "variants": variants, "queries": 300, "draws": 1,
                          **({"heads": heads} if heads else {})},
            "full_gallery": {**gallery, "texts": 500, "images": 1000, "recall_k": 10}}


def _record(label: str, metrics: dict, train_args=(), minutes: float = 45.0) -> dict:
    return {"label": label, "train_args": list(train_args), "steps": 600, "train_minutes": minutes,
            "eval_minutes": 8.0, "device": "cpu", "figures": quality.figures(metrics),
            "sizes": {"sample100_queries": 300, "draws": 1, "gallery_texts": 500, "gallery_images": 1000,
                      "recall_k": 10}}


# ============================================================================================ formatting
def test_table_has_one_row_per_ranking_in_percent():
    fig = quality.figures(_metrics(0.297))
    assert fig["score"]["t2i"] == [29.7, pytest.approx(66.41, abs=0.01), pytest.approx(93.92, abs=0.01)]
    assert fig["gallery_recall_only"]["i2t"][0] == 10.0 and fig["gallery_two_stage"]["t2i"][0] == 12.0
    table = quality.format_table(_record("default", _metrics(0.297)))
    lines = table.splitlines()
    assert "| the ranking score (TIA + itc fused; what the tables use) | 29.7 / 66.4 / 93.9 | 29.7 / 66.4 / 93.9 |" in lines
    assert any(line.startswith("| the itc cosine alone") and "30.0 / 67.1" in line for line in lines)
    assert any(line.startswith("| the TIA head alone") and "15.0 / 33.5" in line for line in lines)
    assert any(line.startswith("| full gallery, two-stage") and "| 12.0 / 26.8" in line for line in lines)
    assert any(line.startswith("| full gallery, recall only") and "| 10.0 / 22.4" in line for line in lines)
    assert ("own colour variant (same group), % text -> image / image -> text: score 10.0 / 12.0, itc 5.0 / 6.0, "
            "TIA 20.0 / 22.0; 40.0% of the queries") in table
    assert ("TIA and the itc cosine, per query: correlation of their scores over its candidates 0.99 / 0.99; Rank@1 "
            "of whichever head is right (an oracle, about the most a fusion could reach) 42.7 / 45.3.") in table
    assert fig["heads"] == {"heads_correlation": {"t2i": 0.991, "i2t": 0.987},
                            "either_head_rank1": {"t2i": 42.7, "i2t": 45.3}}
    assert "Training: 600 steps in 45.0 min on cpu (inside the 45-minute budget" in table
    assert "500 texts x 1000 images, recall-k 10" in table
    # a run records its precision and CPU: minutes, the budget's unit, depend on both
    timed = {**_record("default", _metrics(0.297), minutes=45.1), "precision": "fp32",
             "cpu": "AMD EPYC, 2 cores, no native bf16"}
    assert ("600 steps in 45.1 min on cpu, fp32 (AMD EPYC, 2 cores, no native bf16) (over the 45-minute budget"
            in quality.format_table(timed))
    # a model without an itc head has no itc row figures
    no_itc = quality.format_table(_record("no-itc", _metrics(0.1, with_itc=False), ["--itc-dim", "0"]))
    assert "| the itc cosine alone (`by_head.itc`) | n/a | n/a |" in no_itc and "per query: correlation" not in no_itc


def test_summary_has_the_latest_run_of_each_label():
    records = [_record("default", _metrics(0.2)), _record("neg2", _metrics(0.25), ["--neg-ratio", "2"], 50.0),
               _record("default", _metrics(0.3))]
    lines = quality.format_summary(records).splitlines()
    assert len(lines) == 2 + 2
    assert lines[2] == "| default | (recipe) | 600 | 30.0 / 30.0 / 15.0 | 30.0 / 30.0 / 15.0 | 12.0 / 10.0 | 12.0 / 10.0 | 45.0 |"
    assert lines[3].startswith("| neg2 | --neg-ratio 2 | 600 | 25.0 / 30.0 / 15.0 |") and lines[3].endswith("| 50.0 |")


def test_mean_over_seeds_averages_the_figures_and_keeps_each_seeds_rank1():
    runs = [{**_record("x", _metrics(0.3), minutes=28.0), "model_version": "a-s1-step600"},
            {**_record("x-seed1", _metrics(0.4), ["--seed", "1"], minutes=30.0), "model_version": "b-s2-step600"}]
    runs[1]["figures"]["heads"]["heads_correlation"]["t2i"] = 0.981
    del runs[1]["figures"]["variants"]  # a run evaluated before variants were reported
    mean = quality.mean_record("x-mean", (0, 1), [], runs)
    assert mean["figures"]["score"]["t2i"] == [35.0, pytest.approx(78.26, abs=0.01), pytest.approx(110.68, abs=0.01)]
    assert mean["figures"]["heads"]["heads_correlation"] == {"t2i": 0.986, "i2t": 0.987}
    assert "variants" not in mean["figures"]
    assert (mean["seeds"], mean["seed_labels"], mean["train_minutes"]) == ([0, 1], ["x", "x-seed1"], 29.0)
    assert mean["model_versions"] == ["a-s1-step600", "b-s2-step600"] and mean["steps"] == 600
    table = quality.format_table(mean)
    assert table.startswith("Label `x-mean`, the mean of 2 seeds (0, 1: runs `x`, `x-seed1`), train args `(recipe)`.")
    assert "| the ranking score (TIA + itc fused; what the tables use) | 35.0 / 78.3 / 110.7 |" in table
    assert ("Rank@1 of each seed, text -> image / image -> text: score 30.0 / 30.0 (seed 0), 40.0 / 40.0 (seed 1); "
            "itc 30.0 / 30.0 (seed 0), 30.0 / 30.0 (seed 1); TIA 15.0 / 15.0 (seed 0), 15.0 / 15.0 (seed 1); "
            "gallery two-stage 12.0 / 12.0 (seed 0), 12.0 / 12.0 (seed 1); gallery recall-only") in table
    assert "Training: 600 steps in 29.0 min a seed (mean) on cpu (inside the 45-minute budget" in table
    assert "; evaluation 8.0 min a seed (mean)." in table
    row = quality.format_summary([*runs, mean]).splitlines()[-1]
    assert row.startswith("| x-mean | mean of seeds 0, 1: (recipe) | 600 | 35.0 / 30.0 / 15.0 |")
    assert json.loads(json.dumps(mean)) == mean  # it goes to quality.jsonl


@pytest.mark.parametrize("seeds", ["0,0", "a", "-1", ","])
def test_bad_seeds_are_refused_by_the_parser(seeds, capsys):
    with pytest.raises(SystemExit) as exit_:
        quality.parse_args(["--work", "w", "--seeds", seeds])
    assert exit_.value.code == 2 and "give distinct seeds >= 0, comma-separated" in capsys.readouterr().err


def test_seeds_and_a_seed_in_train_args_are_one_clear_error_before_any_work(tmp_path, capsys):
    work = tmp_path / "w"
    assert quality.parse_args(["--work", "w", "--seeds", "0, 2"]).seeds == (0, 2)
    assert [quality.seed_label("r", k) for k in (0, 2)] == ["r", "r-seed2"]
    assert quality.main(["--work", str(work), "--catalog", "synthetic:4", "--seeds", "0,1",
                         "--train-args", "--lr 1e-3 --seed=3"]) == 2
    assert "--train-args sets --seed and --seeds asks for several" in capsys.readouterr().err
    assert not (work / "features").exists()


# ============================================================================================ --train-args
def _config(*argv):
    a = quality.parse_args(["--work", "w", *argv])
    return quality.train_config(a, Path("feat"), Path("w/train-x"))


def test_train_args_go_over_the_recipe():
    c = _config()
    for name, value in quality.RECIPE.items():
        assert getattr(c, name) == value
    assert (c.features, c.out, c.backbone, c.neg_ratio) == (["feat"], "w/train-x", "minilm", 1)
    c = _config("--train-args", "--neg-ratio 2 --lr 1e-3 --steps 50", "--backbone", "tiny")
    assert (c.neg_ratio, c.lr, c.steps, c.batch_size, c.backbone) == (2, 1e-3, 50, 32, "tiny")
    assert _config("--train-args", "--steps 50", "--steps", "7").steps == 7  # the script's --steps wins
    c = _config("--train-args", "--no-matching-only", "--steps", "600")  # a lone option as the value, which
    # argparse alone would take for one of its own
    assert (c.matching_only, c.tia_warmup, c.itc_warmup, c.steps) == (False, 0.2, 760 / 1200, 600)
    c = _config("--train-args", "--itc-warmup 0", "--steps", "880")  # the 880-step recipe before --itc-warmup
    assert (c.matching_only, c.itc_warmup, c.steps) == (True, 0.0, 880)
    c = _config("--train-args", "--epochs 2")
    assert (c.steps, c.epochs) == (None, 2.0)


@pytest.mark.parametrize("train_args, says", [
    ("--negratio 2", "--train-args: unrecognized arguments: --negratio 2"),
    ("--out elsewhere", "--out is set by bench/quality.py itself"),
    ("--lr 'x", "No closing quotation"),
])
def test_bad_train_args_are_one_clear_error(tmp_path, capsys, train_args, says):
    with pytest.raises(UserError, match=says):
        _config("--train-args", train_args)
    # before any work: no catalog is read, nothing is featurized
    assert quality.main(["--work", str(tmp_path / "w"), "--catalog", "synthetic:4", "--train-args", train_args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench/quality.py: error: ") and says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w" / "features").exists()


def test_user_errors_exit_2(tmp_path, capsys):
    assert quality.main(["--work", str(tmp_path), "--catalog", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert quality.main(["--work", str(tmp_path), "--summary"]) == 2
    assert "no runs yet" in capsys.readouterr().err
    assert quality.main(["--work", str(tmp_path), "--label", "a/b"]) == 2
    assert quality.main(["--work", str(tmp_path / "empty")]) == 2
    assert "give --catalog" in capsys.readouterr().err


# ============================================================================================ image features
def test_other_image_features_get_their_own_folder_and_are_named_in_the_table(tmp_path):
    def folder(*argv):
        return quality.features_folder(quality.parse_args(["--work", str(tmp_path), *argv]))

    assert folder() == tmp_path / "features"
    assert folder("--cnn", "efficientnet-lite2", "--image-size", "512") == tmp_path / "features-efficientnet-lite2-512"
    assert folder("--image-size", "384") == tmp_path / "features-efficientnet-lite0-384"
    assert folder("--features", "elsewhere") == Path("elsewhere")

    record = _record("lite2", _metrics(0.3), ["--neg-ratio", "2"])
    assert "train args `--neg-ratio 2`" in quality.format_table(record)  # no features key: an older record
    record["features"] = {"cnn": "efficientnet-lite2", "image_size": 512}
    assert ("features `--cnn efficientnet-lite2 --image-size 512`, train args `--neg-ratio 2`"
            in quality.format_table(record))
    row = quality.format_summary([record]).splitlines()[2]
    assert row.startswith("| lite2 | features --cnn efficientnet-lite2 --image-size 512, --neg-ratio 2 | 600 |")


def test_features_made_with_other_image_options_are_refused_not_reused(tmp_path, capsys):
    made = tmp_path / "features-efficientnet-lite2-512"
    made.mkdir()
    (made / "_run.json").write_text(json.dumps({"catalog": {"source": "synthetic:4"},
                                                "options": {"cnn": "efficientnet-lite0", "image_size": 256}}))
    (made / "_SUCCESS").write_text("")
    a = quality.parse_args(["--work", str(tmp_path), "--catalog", "synthetic:4", "--cnn", "efficientnet-lite2",
                            "--image-size", "512"])
    with pytest.raises(UserError, match="holds --cnn efficientnet-lite0 --image-size 256 features, not --cnn "
                                        "efficientnet-lite2 --image-size 512; remove"):
        quality.featurize_stage(a, made)
    # --features is featurized already: the options that say how to featurize do not go with it
    assert quality.main(["--work", str(tmp_path), "--features", str(made), "--cnn", "efficientnet-lite2"]) == 2
    assert "--features is featurized already" in capsys.readouterr().err


def test_text_variants_get_their_own_folder_are_checked_and_named_in_the_table(tmp_path, capsys):
    tv = ["--text-variants", "subcategory,title;category,description"]
    a = quality.parse_args(["--work", str(tmp_path), "--catalog", "synthetic:4", *tv])
    folder = quality.features_folder(a)
    assert folder.parent == tmp_path and re.fullmatch(r"features-tv-[0-9a-f]{8}", folder.name)
    assert quality.features_folder(a, variants=False) == tmp_path / "features"
    lite2 = quality.parse_args(["--work", str(tmp_path), "--cnn", "efficientnet-lite2", *tv])
    assert quality.features_folder(lite2).name == f"features-efficientnet-lite2-256-{folder.name[9:]}"
    folder.mkdir()
    (folder / "_run.json").write_text(json.dumps({"catalog": {"source": "synthetic:4"}, "options": {
        "cnn": "efficientnet-lite0", "image_size": 256, "text_variants": [["title"]]}}))
    (folder / "_SUCCESS").write_text("")
    with pytest.raises(UserError, match="holds --text-variants 'title', not 'subcategory,title;category,description'"):
        quality.featurize_stage(a, folder)
    assert quality.features_options(folder)["text_variants"] == "title"
    record = _record("tv", _metrics(0.3), [])
    record["features"] = {"cnn": "efficientnet-lite0", "image_size": 256, "text_variants": "title;category"}
    assert "features `--text-variants 'title;category'`, train args `(recipe)`" in quality.format_table(record)
    assert quality.main(["--work", str(tmp_path), "--features", str(folder), *tv]) == 2
    assert "--features is featurized already" in capsys.readouterr().err


def test_a_variants_folder_links_the_plain_folders_images(tmp_path):
    from fashionbert.data import synth

    manifest = synth.write_catalog(tmp_path / "cat", 4, seed=2)
    columns = ["--work", str(tmp_path / "w"), "--catalog", manifest, "--id-column", "product_id", "--text-columns",
               "title,description", "--category-column", "category", "--subcategory-column", "subcategory",
               "--group-column", ""]
    plain = quality.parse_args(columns)
    quality.featurize_stage(plain, quality.features_folder(plain))
    a = quality.parse_args([*columns, "--text-variants", "subcategory,title"])
    quality.featurize_stage(a, quality.features_folder(a))
    made = json.loads((quality.features_folder(a) / "_run.json").read_text())
    assert made["options"]["previous"] == str(tmp_path / "w" / "features")
    assert made["counts"]["images"]["linked"] == 4 and made["counts"]["images"]["computed"] == 0
    assert made["counts"]["text_variants"] == 4


# ============================================================================================ end to end
def test_end_to_end_on_a_tiny_synthetic_catalog(tmp_path, capsys, tiny_backbone):
    work = tmp_path / "work"
    small = ["--work", str(work), "--backbone", str(tiny_backbone), "--steps", "3", "--queries", "10",
             "--gallery-max", "8", "--recall-k", "5"]
    # (the synthetic catalog ignores the column mapping)
    args = small + ["--catalog", "synthetic:40",
                    "--train-args", "--batch-size 8 --val-queries 8 --num-threads 1 --prefetch 0 --no-progress"]
    assert quality.main(args) == 0
    table = capsys.readouterr().out
    assert "| the ranking score" in table and "| full gallery, recall only" in table and "Training: 3 steps" in table
    assert (work / "features" / "_SUCCESS").is_file() and (work / "train-default" / "model").is_dir()
    metrics = json.loads((work / "eval-default.json").read_text())
    assert metrics["sample100"]["draws"] == 1 and metrics["full_gallery"]["recall_k"] == 5
    assert "recall_only" in metrics["full_gallery"]

    # a second label reuses the features; the same label with other options is refused, not silently reused
    assert quality.main(args + ["--label", "neg2", "--train-args",
                                "--batch-size 8 --val-queries 8 --num-threads 1 --prefetch 0 --no-progress --neg-ratio 2"]) == 0
    assert "reusing" in capsys.readouterr().err
    assert quality.main(args[:-2] + ["--train-args", "--batch-size 4"]) == 2
    err = capsys.readouterr().err
    assert "trained with other options (batch_size 8 there, 4 now" in err and "--retrain" in err
    records = [json.loads(line) for line in (work / "quality.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == ["default", "neg2"]
    assert records[1]["train_args"][-2:] == ["--neg-ratio", "2"] and records[1]["steps"] == 3
    assert records[0]["precision"] in ("bf16", "fp32") and records[0]["cpu"].endswith(" bf16")
    assert set(records[0]["figures"]) == {"score", "tia", "itc", "itc_hub", "gallery_two_stage", "gallery_recall_only",
                                          "gallery_recall_hub", "variants", "heads"}

    assert quality.main(["--work", str(work), "--summary"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 4 and rows[2].startswith("| default |") and rows[3].startswith("| neg2 |")

    # two seeds: seed 0 is the finished plain run (reused), seed 1 trains as default-seed1, and their mean is logged
    assert quality.main(args + ["--seeds", "0,1"]) == 0
    out, err = capsys.readouterr()
    assert f"train: reusing {work / 'train-default'}" in err and f"train: reusing {work / 'train-default-seed1'}" not in err
    assert out.splitlines()[2].startswith("| default | --batch-size 8 ") and "the mean of 2 seeds" in out
    assert out.splitlines()[3].startswith("| default-seed1 | --batch-size 8 ") and out.splitlines()[3].count("--seed 1") == 1
    from fashionbert.model.loading import training_options
    assert training_options(work / "train-default-seed1" / "model")[0]["seed"] == 1
    records = [json.loads(line) for line in (work / "quality.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records[2:]] == ["default", "default-seed1", "default-mean"]
    seeds, mean = records[2:4], records[4]
    assert "--seed" not in mean["train_args"] and records[3]["train_args"][-2:] == ["--seed", "1"]
    assert mean["figures"]["score"]["t2i"][0] == pytest.approx(
        (seeds[0]["figures"]["score"]["t2i"][0] + seeds[1]["figures"]["score"]["t2i"][0]) / 2, abs=1e-3)


# ============================================================================================ --plan
def test_budget_fit_keeps_the_split_or_the_itc_steps_given_as_a_count():
    # the recipe's split (a fraction): 2,400 steps, 1,520 itc-alone at 0.5 s, 880 joint at 1.0 s, 60 s outside them
    fit = quality.budget_fit(60.0, 0.5, 1.0, 2400, 1520, False, 45.0)
    assert fit["run_minutes"] == pytest.approx((60 + 760 + 880) / 60, abs=0.05)
    per_step = (1520 * 0.5 + 880 * 1.0) / 2400
    assert fit["budget_steps"] == int((45 * 60 - 60) // per_step) == 3863
    assert fit["budget_itc_steps"] == round(3863 * 1520 / 2400)
    # --itc-warmup 1520 as a count: those stay, the rest of the budget buys joint steps
    fit = quality.budget_fit(60.0, 0.5, 1.0, 2400, 1520, True, 45.0)
    assert fit["budget_itc_steps"] == 1520 and fit["budget_steps"] == 1520 + (45 * 60 - 60 - 760)
    # no itc-alone steps; and a budget too small for any joint step
    assert quality.budget_fit(0.0, 0.0, 2.0, 100, 0, False, 1.0)["budget_steps"] == 30
    assert quality.budget_fit(60.0, 0.5, 1.0, 2400, 1520, True, 10.0) == {"run_minutes": 28.3, "budget_steps": 0,
                                                                           "budget_itc_steps": 0}


def test_plan_times_the_runs_steps_and_keeps_nothing_but_its_json(tmp_path, capsys, tiny_backbone):
    from tests.fake_features import write_fake_features

    work, features = tmp_path / "work", write_fake_features(tmp_path / "features", n_products=40, feature_dim=16)
    args = ["--work", str(work), "--backbone", str(tiny_backbone), "--features", str(features), "--steps", "100",
            "--plan", "--plan-steps", "4",
            "--train-args", "--batch-size 8 --val-queries 8 --num-threads 1 --prefetch 0 --no-progress"]
    assert quality.main(args) == 0
    out = capsys.readouterr().out
    plan = json.loads((work / "plan-default.json").read_text())
    assert plan["steps"] == 100 and plan["itc_steps"] == round(100 * 760 / 1200)  # the recipe's split
    assert plan["sample_steps"] == {"itc_alone": 4, "joint": 4}
    assert plan["step_seconds"]["itc_alone"] > 0 and plan["step_seconds"]["joint"] > 0 and plan["fixed_seconds"] >= 0
    refit = quality.budget_fit(plan["fixed_seconds"], plan["step_seconds"]["itc_alone"], plan["step_seconds"]["joint"],
                               100, plan["itc_steps"], False, 45.0)  # from the json's rounded times: nearly the same
    assert plan["budget_steps"] == pytest.approx(refit["budget_steps"], rel=0.02) and plan["budget_steps"] > 100
    assert f"the budget holds ~{plan['budget_steps']} steps" in out and f"--steps {plan['budget_steps']}" in out
    assert "this run, 100 steps (63 itc-alone, 37 joint)" in out and "inside the 45-minute budget" in out
    assert sorted(p.name for p in work.iterdir()) == ["plan-default.json"]  # no run left behind

    # no itc-alone steps: only joint ones are timed; an itc count beyond the run and --seeds are one clear error each
    assert quality.main(args[:-1] + [args[-1] + " --itc-warmup 0", "--label", "joint"]) == 0
    plan = json.loads((work / "plan-joint.json").read_text())
    assert plan["sample_steps"] == {"itc_alone": 0, "joint": 4} and plan["step_seconds"]["itc_alone"] == 0
    assert "itc-alone" not in capsys.readouterr().out
    assert quality.main(args[:-1] + [args[-1] + " --itc-warmup 100"]) == 2
    assert "--itc-warmup 100.0 is 100 of the run's 100 steps" in capsys.readouterr().err
    assert quality.main(args + ["--seeds", "0,1"]) == 2
    assert "--plan times one run" in capsys.readouterr().err
    # a bad --plan-steps fails before a catalog is featurized, not minutes after
    fresh = tmp_path / "fresh"
    assert quality.main(["--work", str(fresh), "--catalog", "synthetic:4", "--plan", "--plan-steps", "2"]) == 2
    assert "--plan-steps 2: give 3 or more" in capsys.readouterr().err
    assert not (fresh / "features").exists()


def test_fit_budget_trains_what_the_plan_holds_and_reuses_the_plan_for_the_same_options(tmp_path, capsys,
                                                                                      tiny_backbone, monkeypatch):
    from tests.fake_features import write_fake_features

    work, features = tmp_path / "work", write_fake_features(tmp_path / "features", n_products=40, feature_dim=16)
    tiny = "--batch-size 8 --val-queries 8 --num-threads 1 --prefetch 0 --no-progress"
    base = ["--work", str(work), "--backbone", str(tiny_backbone), "--features", str(features), "--steps", "12",
            "--plan-steps", "3", "--queries", "10", "--gallery-max", "8", "--recall-k", "5"]
    # the plan as --plan writes it; then as if this host were slower: the budget holds 8 of the 12 steps
    assert quality.main(base + ["--plan", "--train-args", tiny]) == 0
    path = work / "plan-default.json"
    plan = json.loads(path.read_text())
    assert plan["features"] == [str(features)] and plan["budget_steps"] > 12
    path.write_text(json.dumps({**plan, "budget_steps": 8, "budget_itc_steps": 5}))
    monkeypatch.setattr(quality, "plan_stage", lambda a, config: pytest.fail("the plan on file fits these options"))
    assert quality.main(base + ["--fit-budget", "--train-args", tiny]) == 0
    captured = capsys.readouterr()
    assert "reusing" in captured.err and "training 8 steps at the run's split (the run as given: 12" in captured.err
    assert "--fit-budget: 8 steps, what the 45-minute budget holds" in captured.out
    assert "Training: 8 steps" in captured.out
    record = json.loads((work / "quality.jsonl").read_text().splitlines()[-1])
    assert record["steps"] == 8 and record["budget_plan"]["budget_steps"] == 8
    from fashionbert.model.loading import training_options
    options = training_options(work / "train-default" / "model")[0]
    assert options["steps"] == 8 and options["itc_warmup"] == pytest.approx(760 / 1200)  # the recipe's split kept

    # other options, or another host, are timed again: here the plan holds more than the run, whose --steps cap it
    timed = []

    def plan_stage(a, config):
        timed.append(config.steps)
        return {**plan, "budget_steps": 14, "train_args": shlex.split(a.train_args)}

    monkeypatch.setattr(quality, "plan_stage", plan_stage)
    assert quality.main(base + ["--fit-budget", "--label", "neg2", "--train-args", tiny + " --neg-ratio 2"]) == 0
    out = capsys.readouterr().out
    assert timed == [12] and "Training: 12 steps" in out and "--steps' cap on what the 45-minute budget" in out
    # without --steps the budget decides both ways: the recipe (here 12 steps) trains the 14 the budget holds
    monkeypatch.setitem(quality.RECIPE, "steps", 12)
    uncapped = [arg for arg in base if arg not in ("--steps", "12")]
    assert quality.steps_given(quality.parse_args(uncapped + ["--train-args", tiny])) is None
    assert quality.steps_given(quality.parse_args(uncapped + ["--train-args", tiny + " --steps 9"])) == 9
    assert quality.main(uncapped + ["--fit-budget", "--label", "fill", "--train-args", tiny]) == 0
    captured = capsys.readouterr()
    assert timed == [12, 12] and "Training: 14 steps" in captured.out
    assert "training 14 steps at the run's split (the run as given: 12)" in captured.err
    assert training_options(work / "train-fill" / "model")[0]["steps"] == 14
    monkeypatch.setattr(quality, "cpu_description", lambda: "another CPU, 2 cores, no native bf16")
    assert quality.reusable_plan(quality.parse_args(base + ["--train-args", tiny]),
                                 quality.train_config(quality.parse_args(base + ["--train-args", tiny]), features,
                                                      work / "x")) is None

    # a budget that holds no run of the shape, and --plan with --fit-budget, are one clear error each
    monkeypatch.setattr(quality, "plan_stage", lambda a, config: {**plan, "budget_steps": 0})
    assert quality.main(base + ["--fit-budget", "--label", "none", "--train-args", tiny]) == 2
    assert "holds no run of this shape on this host" in capsys.readouterr().err
    assert quality.main(base + ["--fit-budget", "--plan", "--train-args", tiny]) == 2
    assert "give one" in capsys.readouterr().err
