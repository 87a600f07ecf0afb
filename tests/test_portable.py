"""Featurize on Beam's portable runner, its workers separate processes from Beam's worker pool (issue #13): the path
Flink, Spark and Dataflow take. Whatever works only in the driver's memory fails here; the outputs must equal the
in-process FnApiRunner's, byte for byte (but _run.json's run id and timings)."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from fashionbert.data import synth
from fashionbert.data.features import DEAD_IMAGE_ROWS
from fashionbert.errors import UserError
from pipelines import featurize as featurize_module
from pipelines import images as img
from pipelines import worker_pool
from pipelines.config import FeaturizeConfig
from pipelines.execution import check_paths_reach_workers, execution
from tests.bad_corpus import make_bad_corpus
from tests.featurize_helpers import (assert_same_view, featurize, live_view, read_kind, read_manifest, run_info,
                                     synthetic_row, write_manifest)


def _refuse_in_driver(self):
    raise AssertionError(f"{type(self).__name__} ran in the driver process")


def _work_only_in_workers(m: pytest.MonkeyPatch) -> None:
    """The CNN and the previous run's image index cannot load in this process (a DoFn's class travels to the
    workers by reference, so theirs is intact): a run that passes did that work in the pool's workers."""
    m.setattr(img.EmbedPatches, "setup", _refuse_in_driver)
    m.setattr(img._ReadPreviousFile, "setup", _refuse_in_driver)


def _files(out) -> dict[str, bytes]:
    """Every output file but _run.json (run id, timings), by name."""
    return {path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.name != "_run.json"}


def assert_same_output(got_out, want_out) -> None:
    assert_same_view(live_view(got_out), live_view(want_out))
    assert sorted(read_kind(got_out, "rejects").to_pylist(), key=repr) == \
        sorted(read_kind(want_out, "rejects").to_pylist(), key=repr)
    assert run_info(got_out)["counts"] == run_info(want_out)["counts"]
    got, want = _files(got_out), _files(want_out)
    assert list(got) == list(want)
    assert [n for n in got if got[n] != want[n]] == []


@pytest.mark.slow
def test_featurize_on_portable_workers_equals_fnapi_runner(tmp_path, portable_pipeline_args):
    manifest, expected = make_bad_corpus(tmp_path / "corpus")
    with pytest.MonkeyPatch.context() as m:
        _work_only_in_workers(m)
        featurize(manifest, tmp_path / "portable", portable_pipeline_args, images_per_shard=4)
    featurize(manifest, tmp_path / "local", images_per_shard=4)
    assert_same_output(tmp_path / "portable", tmp_path / "local")
    counts = run_info(tmp_path / "portable")["counts"]
    assert counts["rejected_rows"] == sum(1 for r in expected.values() if r) > 0
    assert counts["input_rows"] == len(expected) and counts["images"]["computed"] == counts["accepted_images"]


@pytest.mark.slow
def test_incremental_featurize_on_portable_workers_reads_previous_there(tmp_path, portable_pipeline_args):
    manifest = synth.write_catalog(tmp_path / "cat", 12, seed=3)
    base = tmp_path / "base"
    featurize(manifest, base, images_per_shard=5)
    rows = read_manifest(manifest)
    rows[2]["title"] = "a new title"  # changed text, image carried
    write_manifest(manifest, rows[1:] + [synthetic_row(manifest, 3, 100)])  # one deleted, one added
    with pytest.MonkeyPatch.context() as m:
        _work_only_in_workers(m)
        featurize(manifest, tmp_path / "portable", portable_pipeline_args, previous=str(base), images_per_shard=5)
    featurize(manifest, tmp_path / "local", previous=str(base), images_per_shard=5)
    assert_same_output(tmp_path / "portable", tmp_path / "local")
    c = run_info(tmp_path / "portable")["counts"]
    assert c["images"]["new"] == 1 and c["images"]["deleted"] == 1 and c["images"]["linked"] == 11
    assert c["text_rows"] == {"computed": 2, "carried": 10, "deleted": 2}
    dead = pq.read_table(tmp_path / "portable" / DEAD_IMAGE_ROWS)
    assert dead.num_rows == 1  # the deleted image's row in its linked file


REMOTE = {
    "Dataflow": ["--runner=DataflowRunner", "--project=p", "--region=europe-west1", "--temp_location=gs://b/tmp"],
    "Flink, docker workers": ["--runner=FlinkRunner", "--flink_master=jobmanager:8081", "--environment_type=DOCKER"],
    "Flink, process workers": ["--runner=FlinkRunner", "--flink_master=jobmanager:8081", "--environment_type=PROCESS",
                               '--environment_config={"command": "/opt/boot"}'],
    "embedded job server, remote worker pool": ["--runner=PortableRunner", "--job_endpoint=embed",
                                                "--environment_type=EXTERNAL", "--environment_config=pool:50000"],
    "remote job server": ["--runner=PortableRunner", "--job_endpoint=spark:8099", "--environment_type=EXTERNAL",
                          "--environment_config=localhost:50000"],
}
LOCAL = {
    "default": [],
    "two threads": ["--direct_num_workers=2"],
    "Flink, loopback": ["--runner=FlinkRunner", "--flink_master=jobmanager:8081", "--environment_type=LOOPBACK"],
    "embedded job server, local worker pool": worker_pool.portable_args(50000),
    "embedded job server, process workers": ["--runner=PortableRunner", "--job_endpoint=embed",
                                             "--environment_type=PROCESS", '--environment_config={"command": "b"}'],
}


@pytest.mark.parametrize("name", sorted(REMOTE))
def test_local_paths_are_refused_where_workers_run_elsewhere(name):
    where = execution(REMOTE[name])
    with pytest.raises(UserError, match=r"--out /data/features, --catalog /data/m.csv: a local path.*gs://"):
        check_paths_reach_workers(where, {"--out": "/data/features", "--previous": None, "--catalog": "/data/m.csv"},
                                  shared_filesystem=False)
    check_paths_reach_workers(where, {"--out": "gs://b/features", "--catalog": "s3://b/m.csv"}, False)
    check_paths_reach_workers(where, {"--out": "/mnt/nfs/features"}, shared_filesystem=True)
    assert not where.in_process


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_local_paths_are_fine_where_workers_run_here(name):
    where = execution(LOCAL[name])
    check_paths_reach_workers(where, {"--out": "/data/features", "--catalog": "/data/m.csv"}, False)
    assert where.in_process == (name in ("default", "two threads", "Flink, loopback"))


def test_featurize_refuses_a_local_out_on_dataflow_before_starting(tmp_path):
    cfg = FeaturizeConfig(catalog="synthetic:4", out=str(tmp_path / "features"), progress=False)
    with pytest.raises(UserError, match="--out .*features: a local path, but with --runner DataflowRunner"):
        featurize_module.run(cfg, REMOTE["Dataflow"])
    assert os.listdir(tmp_path) == []


def test_worker_pool_stop_ends_its_process_group(tmp_path):
    pool = worker_pool.start(log_path=str(tmp_path / "pool.log"))
    assert pool.args[-1] == f"--environment_config=localhost:{pool.port}"
    pool.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pool.proc.pid, 0)
