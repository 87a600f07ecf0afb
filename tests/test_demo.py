"""The demo's reuse rule: a second demo run reuses the model only when features and training recipe are unchanged."""
import json

from fashionbert.commands import demo


def _fake_training(calls):
    def command(module, argv):
        out = argv[argv.index("--out") + 1]
        demo.os.makedirs(f"{out}/model", exist_ok=True)
        with open(f"{out}/model/config.json", "w") as fh:
            fh.write("{}")
        with open(f"{out}/summary.json", "w") as fh:
            json.dump({"final_step": len(calls) + 1}, fh)
        calls.append(argv)
        return {"final_step": len(calls)}
    return command


def test_model_reused_only_for_same_features_and_recipe(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "_command", _fake_training(calls))
    out = str(tmp_path / "train")
    assert demo._train("feats", out, reuse=False) == {"final_step": 1}
    assert json.loads((tmp_path / "train" / "_demo_train_args.json").read_text()) == demo.DEMO_TRAIN_ARGS
    again = demo._train("feats", out, reuse=True)
    assert again["reused"] and len(calls) == 1
    demo._train("feats", out, reuse=False)  # features changed
    assert len(calls) == 2
    monkeypatch.setattr(demo, "DEMO_TRAIN_ARGS", [*demo.DEMO_TRAIN_ARGS, "--seed", "1"])  # recipe changed
    retrained = demo._train("feats", out, reuse=True)
    assert "reused" not in retrained and len(calls) == 3 and calls[-1][-2:] == ["--seed", "1"]
