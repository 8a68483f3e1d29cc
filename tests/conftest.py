import pytest
import torch

from adacache_fx.zoo import ZOO


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


ALL_MODELS = sorted(ZOO)
