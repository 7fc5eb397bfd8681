"""Shared helpers of the model-toolkit tests (PyTorch)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def randomized_encoder():
    """``randomized_encoder(preset, seed)``: a SparseEncoder with seeded weights and non-trivial
    BN statistics, in eval mode."""
    torch = pytest.importorskip("torch")
    from bevfusion_ros.model.sparse_encoder import SparseEncoder

    def build(preset, seed: int) -> SparseEncoder:
        torch.manual_seed(seed)
        encoder = SparseEncoder(preset)
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
        return encoder.eval()

    return build
