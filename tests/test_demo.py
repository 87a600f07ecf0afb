"""The demo's reuse rule: a second demo run reuses the model only when features and training recipe are unchanged."""
import json

from fashionbert.commands import demo
from fashionbert.train import trainer
from fashionbert.train.config import TrainConfig


def _fake_training(calls):
    def run(config):
        assert isinstance(config, TrainConfig)
        out = config.out
        demo.os.makedirs(f"{out}/model", exist_ok=True)
        with open(f"{out}/model/config.json", "w") as fh:
            fh.write("{}")
        with open(f"{out}/summary.json", "w") as fh:
            json.dump({"final_step": len(calls) + 1}, fh)
        calls.append(config)
        return {"final_step": len(calls)}
    return run


def test_model_reused_only_for_same_features_and_recipe(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer, "run", _fake_training(calls))
    out = str(tmp_path / "train")
    assert demo._train("feats", out, reuse=False) == {"final_step": 1}
    assert calls[0].features == ["feats"] and calls[0].out == out
    assert all(getattr(calls[0], k) == v for k, v in demo.DEMO_TRAIN.items())
    assert json.loads((tmp_path / "train" / demo.RECIPE_STAMP).read_text()) == demo._recipe(calls[0])
    again = demo._train("feats", out, reuse=True)
    assert again["reused"] and len(calls) == 1
    demo._train("feats", out, reuse=False)  # features changed
    assert len(calls) == 2
    monkeypatch.setattr(demo, "DEMO_TRAIN", {**demo.DEMO_TRAIN, "seed": 1})  # recipe changed
    retrained = demo._train("feats", out, reuse=True)
    assert "reused" not in retrained and len(calls) == 3 and calls[-1].seed == 1
