"""The chain as iota sees it: who is registered (uid, stake, validator permit) and where weights are set."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Neuron:
    """One registered hotkey on the subnet."""

    uid: int
    hotkey: str  # ss58 address
    coldkey: str  # ss58 address
    stake: float  # in TAO (alpha on dynamic subnets)
    validator_permit: bool


class Chain(ABC):
    """Registry of the subnet's neurons and the weight ledger. BittensorChain in production, LocalChain on one machine."""

    @abstractmethod
    def neurons(self) -> list[Neuron]:
        """Every registered neuron, as of the last sync."""

    def neuron(self, hotkey: str) -> Neuron | None:
        """The neuron registered with this hotkey, or None."""
        return next((n for n in self.neurons() if n.hotkey == hotkey), None)

    @abstractmethod
    def set_weights(
        self, keypair: object, uids: Sequence[int], weights: Sequence[float], version_key: int
    ) -> None:
        """Set this validator's weights (normalised by the implementation); raises ChainError on refusal."""

    @abstractmethod
    def sync(self) -> None:
        """Refresh the cached registry from the chain."""

    def weights_version(self) -> int:
        """The lowest version_key the chain accepts with set_weights (0: any)."""
        return 0


class ChainError(RuntimeError):
    """The chain refused or could not complete a request."""
