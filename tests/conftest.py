"""Fixtures shared by the model, training and scoring tests."""
import pytest

from tests.fake_features import make_tiny_backbone


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    """A random 2-layer, 64-wide BERT folder with the packaged vocab: fast enough to train in tests."""
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))
