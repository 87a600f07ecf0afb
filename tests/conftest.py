"""Fixtures shared by the model, training, scoring and portable-runner tests."""
import pytest

from tests.fake_features import make_tiny_backbone


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    """A random 2-layer, 64-wide BERT folder with the packaged vocab: fast enough to train in tests."""
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def portable_pipeline_args(tmp_path_factory):
    """Pipeline options that run a job on Beam's portable runner, its workers separate processes started by Beam's
    worker pool (`pipelines.worker_pool`): started once per session, stopped with its workers at the end. A pool that
    cannot start fails the test: CI must prove the portable path, not skip it."""
    from pipelines import worker_pool

    log = tmp_path_factory.mktemp("worker-pool") / "pool.log"
    try:
        pool = worker_pool.start(log_path=str(log))
    except RuntimeError as exc:
        pytest.fail(f"Beam's worker pool did not start, so the portable-runner tests cannot run: {exc}")
    try:
        yield list(pool.args)
    finally:
        pool.stop()
