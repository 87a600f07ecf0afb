"""featurize's `--precision auto`: fp32 on a CPU that would emulate bf16, bf16 where it is native, the previous run's
precision for an incremental run; made concrete in the driver and recorded, never hashed as "auto"."""
from __future__ import annotations

import dataclasses
import json

import pytest

from fashionbert.errors import UserError
from pipelines.config import FeaturizeConfig
from pipelines.execution import execution
from pipelines.featurize import resolve_precision
from tests.featurize_helpers import featurize

LOCAL = execution(["--runner=FnApiRunner"])


@pytest.fixture
def native_bf16(monkeypatch):
    """Set whether this machine's CPU has native bf16, whatever it really has."""
    def set_native(value: bool):
        monkeypatch.setattr("fashionbert.runtime.cpu_has_native_bf16", lambda: value)
    return set_native


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_this_cpu(native_bf16, native, expected):
    native_bf16(native)
    cfg = resolve_precision(FeaturizeConfig("synthetic:2", "out"), LOCAL)
    assert cfg.precision == expected
    cfg.image_fingerprint()  # concrete, so it hashes


def test_auto_on_workers_elsewhere_keeps_bf16(native_bf16):
    native_bf16(False)  # the driver's CPU says nothing about the workers'
    remote = dataclasses.replace(LOCAL, same_machine=False)
    assert resolve_precision(FeaturizeConfig("synthetic:2", "out"), remote).precision == "bf16"


@pytest.mark.parametrize("named", ["bf16", "fp32"])
def test_a_named_precision_is_kept(native_bf16, named):
    native_bf16(named == "fp32")  # the opposite of what auto would pick
    assert resolve_precision(FeaturizeConfig("synthetic:2", "out", precision=named), LOCAL).precision == named


def test_auto_is_never_hashed():
    with pytest.raises(ValueError, match="resolve_precision"):
        FeaturizeConfig("synthetic:2", "out").image_fingerprint()


def test_an_unknown_precision_is_one_clear_error():
    with pytest.raises(UserError, match=r"--precision 'fp16': choose one of auto, bf16, fp32"):
        FeaturizeConfig("synthetic:2", "out", precision="fp16").check()


def test_a_previous_run_without_a_record_falls_back_to_this_cpu(tmp_path, native_bf16):
    native_bf16(False)
    (tmp_path / "_run.json").write_text(json.dumps({"options": {}}))
    cfg = FeaturizeConfig("synthetic:2", "out", previous=str(tmp_path))
    assert resolve_precision(cfg, LOCAL).precision == "fp32"
    (tmp_path / "_run.json").write_text("{not json")
    assert resolve_precision(cfg, LOCAL).precision == "fp32"


def test_incremental_auto_keeps_the_previous_precision_and_carries_every_row(tmp_path, native_bf16):
    """A nightly run moved to a CPU without native bf16 links last night's bf16 rows instead of recomputing the
    catalog in fp32; a run from scratch on it computes and records fp32, under another fingerprint."""
    native_bf16(False)
    first = featurize("synthetic:4", tmp_path / "bf16", precision="bf16")
    assert first["options"]["precision"] == "bf16"
    second = featurize("synthetic:4", tmp_path / "next", previous=str(tmp_path / "bf16"))
    assert second["options"]["precision"] == "bf16"
    assert second["options"]["image_fingerprint"] == first["options"]["image_fingerprint"]
    assert second["counts"]["images"]["computed"] == 0 and second["counts"]["images"]["carried"] == 4
    fresh = featurize("synthetic:4", tmp_path / "fp32")
    assert fresh["options"]["precision"] == "fp32"
    assert fresh["options"]["image_fingerprint"] != first["options"]["image_fingerprint"]
    recorded = json.loads((tmp_path / "fp32" / "_run.json").read_text())["options"]["precision"]
    assert recorded == "fp32"


def test_fp32_features_do_not_depend_on_the_batch():
    """Carried rows must equal recomputed ones bit for bit, and an incremental run batches its few new images
    differently from a full run: in fp32 an image's features are the same alone, in any place of a larger batch,
    and in a batch of other images."""
    import numpy as np

    from fashionbert.data import synth
    from fashionbert.model.patch_cnn import FP32_CHUNK, PatchCNN, run_batched
    from pipelines.decode import decode_image, fit_square

    images = np.stack([fit_square(decode_image(synth.render_product(5, i).image_bytes), 256) for i in range(7)])
    model = PatchCNN(mode="grid")
    whole = run_batched(model, images, "fp32")
    assert whole.shape[0] == 7 and 7 % FP32_CHUNK  # the last call is padded
    alone = np.concatenate([run_batched(model, images[i:i + 1], "fp32") for i in range(7)])
    shifted = np.roll(run_batched(model, np.roll(images, 3, axis=0), "fp32"), -3, axis=0)
    assert np.array_equal(alone, whole) and np.array_equal(shifted, whole)
    with pytest.raises(ValueError, match="neither bf16 nor fp32"):
        run_batched(model, images, "auto")
