"""Fixtures of the pruning tests."""

import pytest
from prune_models import ConvNet, mlp, tie_free_


@pytest.fixture
def convnet():
    return tie_free_(ConvNet())


@pytest.fixture
def mlp_model():
    return tie_free_(mlp())
