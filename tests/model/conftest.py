"""Shared fixtures for the model tests: the `test` preset and a batch of tokens for it."""

import pytest
import torch

from iota.model import ModelConfig, preset

VOCAB = 200  # padded to 256 by preset()


@pytest.fixture
def config() -> ModelConfig:
    return preset("test", VOCAB)


@pytest.fixture
def tokens(config: ModelConfig) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, config.seq_len + 1), generator=generator)  # inputs and shifted targets
