"""Settings per role (pydantic-settings), read once in each entry point."""

from iota.config.settings import (
    ChainSettings,
    MinerSettings,
    OrchestratorSettings,
    RunSettings,
    ValidatorSettings,
    WalletSettings,
    env_example,
)

__all__ = [
    "ChainSettings",
    "MinerSettings",
    "OrchestratorSettings",
    "RunSettings",
    "ValidatorSettings",
    "WalletSettings",
    "env_example",
]
