"""Chain on Bittensor (SDK v11): the subnet's metagraph as Neurons, synced lazily, and set_weights with retries."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import bittensor as bt
from bittensor.settings import resolve_endpoint
from loguru import logger

from iota.chain.base import Chain, ChainError, Neuron
from iota.chain.weights import normalize_weights

RAO_PER_UNIT = 1_000_000_000  # TAO and every subnet's alpha have 9 decimals

# Refusals that a retry a few seconds later would meet again: surface them at once.
_PERMANENT = {
    bt.ErrorCode.INVALID_ARGUMENT,
    bt.ErrorCode.NOT_REGISTERED,
    bt.ErrorCode.NOT_AUTHORIZED,
    bt.ErrorCode.POLICY_VIOLATION,
    bt.ErrorCode.RATE_LIMITED,  # the limit is counted in blocks (minutes), far past any backoff
    bt.ErrorCode.SUBNET_NOT_EXISTS,
}


def neurons_from_metagraph(metagraph: Any) -> list[Neuron]:
    """Our Neurons from a v11 `bittensor.Metagraph` (or anything with its `neurons` rows).

    Each row carries uid, hotkey, coldkey, validator_permit and `total_stake`, the stake the chain weighs
    a hotkey by on this subnet (in the subnet's alpha; TAO on netuid 0), as a Balance or a plain number.
    """
    return [
        Neuron(
            uid=int(row.uid),
            hotkey=str(row.hotkey),
            coldkey=str(row.coldkey),
            stake=_amount(row.total_stake),
            validator_permit=bool(row.validator_permit),
        )
        for row in metagraph.neurons
    ]


def _amount(value: Any) -> float:
    """A Balance (counted in rao) or a plain number, as whole units."""
    if value is None:
        return 0.0
    rao = getattr(value, "rao", None)
    return int(rao) / RAO_PER_UNIT if rao is not None else float(value)


class BittensorChain(Chain):
    """The subnet on a Bittensor network. Nothing connects until the first read or write.

    `neurons()` re-syncs the metagraph when the last sync is older than `sync_interval_s`; if that re-sync
    fails, the last good registry is served (and the failure logged) until the next interval, so a chain
    endpoint blip does not lock every miner out. Only the first sync's failure raises.
    """

    def __init__(
        self,
        network: str,
        netuid: int,
        sync_interval_s: float = 100.0,
        wallet_for_weights: object | None = None,
        retries: int = 3,
        backoff_s: float = 2.0,
        subtensor_factory: Callable[[str], Any] | None = None,
    ) -> None:
        """`network`: a name bittensor knows (finney, test, local, ...) or a ws(s):// endpoint.

        `wallet_for_weights`: what signs set_weights (a `bt.Wallet`, a "cold/hot" wallet name, or a
        Keypair); when None, the keypair passed to `set_weights` signs. `retries`: extra attempts after a
        transient failure, waiting `backoff_s`, then twice that, and so on. `subtensor_factory` builds the
        client from `network` (default `bt.Subtensor`, itself cold until first use).
        """
        try:
            resolve_endpoint(network)  # a typo in the network fails here, without touching the network
        except ValueError as error:
            raise ChainError(str(error)) from error
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.network = network
        self.netuid = netuid
        self.sync_interval_s = sync_interval_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._wallet_for_weights = wallet_for_weights
        self._subtensor_factory: Callable[[str], Any] = subtensor_factory or bt.Subtensor
        self._subtensor: Any = None
        self._neurons: list[Neuron] | None = None
        self._synced_at = 0.0
        # The orchestrator reads neurons from many request threads; one sync at a time is enough.
        self._lock = threading.Lock()

    # Registry --------------------------------------------------------------------------------------

    def neurons(self) -> list[Neuron]:
        with self._lock:
            if self._neurons is None:
                return list(self._sync_locked())
            if time.monotonic() - self._synced_at >= self.sync_interval_s:
                try:
                    self._sync_locked()
                except ChainError as error:
                    self._synced_at = time.monotonic()  # wait a full interval before trying again
                    logger.warning("metagraph re-sync failed, serving the previous one: {}", error)
            return list(self._neurons)

    def sync(self) -> None:
        with self._lock:
            self._sync_locked()

    def _sync_locked(self) -> list[Neuron]:
        try:
            metagraph = self._client().subnets.metagraph(self.netuid, commitments=False)
        except (bt.BittensorError, OSError, TimeoutError) as error:
            raise ChainError(f"metagraph of netuid {self.netuid} on {self.network}: {error}") from error
        if metagraph is None:
            raise ChainError(f"netuid {self.netuid} does not exist on {self.network}")
        self._neurons = neurons_from_metagraph(metagraph)
        self._synced_at = time.monotonic()
        return self._neurons

    def weights_version(self) -> int:
        try:
            value = self._client().query(bt.storage.SubtensorModule.WeightsVersionKey, [self.netuid])
        except (bt.BittensorError, OSError, TimeoutError) as error:
            raise ChainError(f"weights version of netuid {self.netuid} on {self.network}: {error}") from error
        return int(value or 0)

    # Weights ---------------------------------------------------------------------------------------

    def set_weights(
        self, keypair: object, uids: Sequence[int], weights: Sequence[float], version_key: int
    ) -> None:
        """Submit weights signed by `wallet_for_weights` (else `keypair`); waits for inclusion.

        The floats go to bittensor's SetWeights, which clips them to the subnet's max_weight_limit,
        quantises them to u16 exactly as `normalize_weights` does, and picks plain or commit-reveal
        submission from the subnet's settings. They are checked here first so a bad vector never costs
        a round trip.
        """
        signer = self._wallet_for_weights if self._wallet_for_weights is not None else keypair
        if signer is None:
            raise ChainError("no wallet to sign set_weights: pass a keypair or wallet_for_weights")
        norm_uids, _ = normalize_weights(uids, weights)
        if not norm_uids:
            raise ChainError("all weights are zero; nothing to set")
        intent = bt.SetWeights(
            netuid=self.netuid,
            uids=[int(uid) for uid in uids],
            weights=[float(w) for w in weights],
            version_key=int(version_key),
        )
        attempts = self.retries + 1
        failure: BaseException | None = None
        for attempt in range(attempts):
            try:
                result = self._client().execute(
                    intent, signer, wait_for_inclusion=True, wait_for_finalization=False
                )
                result.raise_for_failure()
                return
            except bt.ChainError as error:
                # The SDK raises its ChainError from the preflight and returns one in a failed result
                # (raise_for_failure above): both land here, with the chain's message and error code.
                failure = error
                if error.code in _PERMANENT:
                    raise ChainError(f"set_weights refused: {error.message}") from error
            except (bt.RpcConnectionError, bt.ConnectionNotReady, OSError, TimeoutError) as error:
                failure = error
            except bt.BittensorError as error:  # the SDK refused the request itself: not transient
                raise ChainError(f"set_weights refused: {error}") from error
            if attempt + 1 < attempts:
                delay = self.backoff_s * 2**attempt
                logger.warning(
                    "set_weights attempt {}/{} failed ({}); retry in {:.1f} s",
                    attempt + 1,
                    attempts,
                    failure,
                    delay,
                )
                time.sleep(delay)
        raise ChainError(f"set_weights failed after {attempts} attempts: {failure}") from failure

    # Connection ------------------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._subtensor is None:
            self._subtensor = self._subtensor_factory(self.network)
        return self._subtensor

    def close(self) -> None:
        """Close the connection if one was opened."""
        if self._subtensor is not None:
            self._subtensor.close()
            self._subtensor = None
