"""Fixtures for the pipeline tests: one small real dataset for the whole session."""
import pytest

from tests.train.conftest import build_dataset


@pytest.fixture(scope="session")
def pp_dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("ppdata") / "ds", n_docs=200)
