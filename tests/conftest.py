import logging

import pytest

import higgs_patch


@pytest.fixture(autouse=True)
def _no_patch_leaks():
    """Every test starts and ends with nothing applied, whatever it did."""
    higgs_patch.revert()
    yield
    higgs_patch.revert()


@pytest.fixture
def patch_log(caplog):
    caplog.set_level(logging.INFO, logger="higgs_patch")
    return caplog
