"""Chain on one machine: a JSON registry and weight ledger that several processes share through a file lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bittensor.wallets import is_bittensor_address
from loguru import logger

from iota.chain.base import Chain, ChainError, Neuron
from iota.chain.weights import normalize_weights

# Defaults for a new chain file, taken from subtensor's own defaults so local runs meet the same limits.
DEFAULT_NETUID = 1
DEFAULT_WEIGHTS_RATE_LIMIT_S = 1200.0  # WeightsSetRateLimit: 100 blocks of 12 s
DEFAULT_MAX_NEURONS = 256  # MaxAllowedUids
FORMAT_VERSION = 1


@dataclass(frozen=True)
class WeightsEntry:
    """The weights one validator hotkey last set, as the chain stores them."""

    weights: dict[int, int]  # uid -> u16 value; uids with zero weight are absent
    version_key: int
    set_at: float  # unix seconds (wall clock: it is compared across processes)


class LocalChain(Chain):
    """Subnet registry and weight ledger in one JSON file, for every process of one machine.

    Every change is a read-modify-write under an exclusive `flock` on a side file (`<path>.lock`), and the
    file is replaced atomically, so readers never see a half-written file and never need the lock.
    The subnet's hyperparameters (netuid, rate limit, capacity, minimum version key) live in the file: the
    first process creates it with its values; later ones may leave a value as None to adopt the file's,
    and an explicit value that disagrees with the file is refused rather than silently changing the rules.
    """

    def __init__(
        self,
        path: Path | str,
        netuid: int | None = None,
        weights_rate_limit_s: float | None = None,
        max_neurons: int | None = None,
        weights_version: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._clock = clock
        requested = {
            "netuid": netuid,
            "weights_rate_limit_s": weights_rate_limit_s,
            "max_neurons": max_neurons,
            "weights_version": weights_version,
        }
        if max_neurons is not None and max_neurons < 1:
            raise ValueError(f"max_neurons must be at least 1, got {max_neurons}")
        if weights_rate_limit_s is not None and not weights_rate_limit_s >= 0:
            raise ValueError(f"weights_rate_limit_s must be >= 0, got {weights_rate_limit_s}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._exclusive():
            if self.path.exists():
                self._check_hyperparameters(self._read()["hyperparameters"], requested)
            else:
                self._write(_new_state(requested))

    # Hyperparameters -------------------------------------------------------------------------------

    @property
    def netuid(self) -> int:
        return int(self._read()["hyperparameters"]["netuid"])

    @property
    def weights_rate_limit_s(self) -> float:
        return float(self._read()["hyperparameters"]["weights_rate_limit_s"])

    @property
    def max_neurons(self) -> int:
        return int(self._read()["hyperparameters"]["max_neurons"])

    def weights_version(self) -> int:
        return int(self._read()["hyperparameters"]["weights_version"])

    # Registry --------------------------------------------------------------------------------------

    def neurons(self) -> list[Neuron]:
        return [_neuron(record) for record in self._read()["neurons"]]

    def sync(self) -> None:
        """Nothing to do: every read goes to the file."""

    def register(
        self, hotkey: str, coldkey: str, stake: float = 0.0, validator_permit: bool = False
    ) -> Neuron:
        """Register a hotkey (idempotent: an already-registered hotkey keeps its uid and is returned as is).

        When the subnet is full, the non-validator with the lowest stake (the oldest registration among
        equals) loses its uid to the new hotkey, as subtensor prunes; its weights and every weight set on
        its uid are dropped, since they were about a different hotkey.
        """
        for role, address in (("hotkey", hotkey), ("coldkey", coldkey)):
            if not is_bittensor_address(address):
                raise ChainError(f"{role} {address!r} is not a valid ss58 address")
        _check_stake(stake)
        with self._transaction() as state:
            records = state["neurons"]
            existing = next((r for r in records if r["hotkey"] == hotkey), None)
            if existing is not None:
                if existing["coldkey"] != coldkey:
                    raise ChainError(
                        f"hotkey {hotkey} is already registered on uid {existing['uid']} "
                        f"under coldkey {existing['coldkey']}, not {coldkey}"
                    )
                return _neuron(existing)
            record = {
                "hotkey": hotkey,
                "coldkey": coldkey,
                "stake": float(stake),
                "validator_permit": bool(validator_permit),
                "registration": state["registrations"],
            }
            state["registrations"] += 1
            if len(records) < state["hyperparameters"]["max_neurons"]:
                record["uid"] = len(records)
                records.append(record)
            else:
                pruned = _prune_candidate(records)
                record["uid"] = pruned["uid"]
                records[pruned["uid"]] = record
                _forget(state, pruned)
                logger.info(
                    "local chain full: uid {} passes from {} to {}", pruned["uid"], pruned["hotkey"], hotkey
                )
            return _neuron(record)

    def set_stake(self, hotkey: str, stake: float, validator_permit: bool | None = None) -> Neuron:
        """Change a registered hotkey's stake (and its validator permit when given)."""
        _check_stake(stake)
        with self._transaction() as state:
            record = _record_of(state, hotkey)
            record["stake"] = float(stake)
            if validator_permit is not None:
                record["validator_permit"] = bool(validator_permit)
            return _neuron(record)

    # Weights ---------------------------------------------------------------------------------------

    def set_weights(
        self, keypair: object, uids: Sequence[int], weights: Sequence[float], version_key: int
    ) -> None:
        """Store this validator's weights as u16, under the chain's rules (permit, rate limit, version key).

        `keypair` is anything with an `ss58_address` (a bittensor Keypair or Wallet hotkey) or the ss58
        string itself: on one machine nothing is signed, the file's permissions are the only guard.
        """
        hotkey = _hotkey_of(keypair)
        norm_uids, values = normalize_weights(uids, weights)
        if not norm_uids:
            raise ChainError("all weights are zero; nothing to set")
        with self._transaction() as state:
            record = _record_of(state, hotkey)
            if not record["validator_permit"]:
                raise ChainError(f"hotkey {hotkey} (uid {record['uid']}) has no validator permit")
            required = state["hyperparameters"]["weights_version"]
            if required and version_key < required:
                raise ChainError(f"version_key {version_key} is older than the subnet's {required}")
            unknown = [uid for uid in norm_uids if uid >= len(state["neurons"])]
            if unknown:
                raise ChainError(f"uids not registered on the subnet: {unknown}")
            now = self._clock()
            previous = state["weights"].get(hotkey)
            rate_limit = state["hyperparameters"]["weights_rate_limit_s"]
            if previous is not None and now - previous["set_at"] < rate_limit:
                wait = rate_limit - (now - previous["set_at"])
                raise ChainError(
                    f"hotkey {hotkey} set weights {now - previous['set_at']:.1f} s ago; "
                    f"the rate limit is {rate_limit:g} s, retry in {wait:.1f} s"
                )
            state["weights"][hotkey] = {
                "weights": [[uid, value] for uid, value in zip(norm_uids, values, strict=True)],
                "version_key": int(version_key),
                "set_at": now,
            }

    def weights(self) -> dict[str, WeightsEntry]:
        """Every validator's last weights, by hotkey."""
        return {hotkey: _weights_entry(entry) for hotkey, entry in self._read()["weights"].items()}

    def weights_entry(self, hotkey: str) -> WeightsEntry | None:
        """What this hotkey last set (weights, version key, time), or None if it never set any."""
        entry = self._read()["weights"].get(hotkey)
        return None if entry is None else _weights_entry(entry)

    def weights_of(self, hotkey: str) -> dict[int, int]:
        """This validator's weights as stored: uid -> u16 (empty if it never set any)."""
        entry = self.weights_entry(hotkey)
        return {} if entry is None else entry.weights

    # File ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        # A side lock file, because the data file's inode changes on every atomic replace.
        with open(self._lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[str, Any]]:
        """The state to change under the lock; written back only if the block finishes without raising."""
        with self._exclusive():
            state = self._read()
            yield state
            self._write(state)

    def _read(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError as error:
            raise ChainError(f"local chain file {self.path} is gone") from error
        except json.JSONDecodeError as error:
            raise ChainError(f"local chain file {self.path} is not valid JSON: {error}") from error
        if state.get("format") != FORMAT_VERSION:
            raise ChainError(
                f"local chain file {self.path} has format {state.get('format')}, expected {FORMAT_VERSION}"
            )
        return state

    def _write(self, state: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as tmp_file:
                json.dump(state, tmp_file, indent=1)
                tmp_file.flush()
                os.fsync(tmp_file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _check_hyperparameters(self, stored: dict[str, Any], requested: dict[str, Any]) -> None:
        conflicts = {
            name: (value, stored[name])
            for name, value in requested.items()
            if value is not None and value != stored[name]
        }
        if conflicts:
            described = ", ".join(
                f"{name}={asked!r} (file has {has!r})" for name, (asked, has) in conflicts.items()
            )
            raise ChainError(
                f"local chain {self.path} was created with other hyperparameters: {described}; "
                "pass the same values, leave them unset, or start a new chain file"
            )


def register_command(
    chain_path: Path | str, hotkey_ss58: str, coldkey_ss58: str, stake: float, validator: bool
) -> Neuron:
    """`iota chain register`: afterwards the hotkey is registered with this stake and validator permit.

    Registering is idempotent; a re-run with another stake or permit updates them, which is what an operator
    re-running the command means. The chain file is created with default hyperparameters if missing.
    """
    chain = LocalChain(chain_path)
    neuron = chain.register(hotkey_ss58, coldkey_ss58, stake=stake, validator_permit=validator)
    if neuron.stake != stake or neuron.validator_permit != validator:
        neuron = chain.set_stake(hotkey_ss58, stake, validator_permit=validator)
    return neuron


def _new_state(requested: dict[str, Any]) -> dict[str, Any]:
    defaults = {
        "netuid": DEFAULT_NETUID,
        "weights_rate_limit_s": DEFAULT_WEIGHTS_RATE_LIMIT_S,
        "max_neurons": DEFAULT_MAX_NEURONS,
        "weights_version": 0,
    }
    hyperparameters = {
        name: default if requested[name] is None else requested[name] for name, default in defaults.items()
    }
    # registrations counts every registration ever made: the order that "oldest" refers to when pruning.
    return {
        "format": FORMAT_VERSION,
        "hyperparameters": hyperparameters,
        "registrations": 0,
        "neurons": [],
        "weights": {},
    }


def _neuron(record: dict[str, Any]) -> Neuron:
    return Neuron(
        uid=int(record["uid"]),
        hotkey=record["hotkey"],
        coldkey=record["coldkey"],
        stake=float(record["stake"]),
        validator_permit=bool(record["validator_permit"]),
    )


def _weights_entry(entry: dict[str, Any]) -> WeightsEntry:
    return WeightsEntry(
        weights={int(uid): int(value) for uid, value in entry["weights"]},
        version_key=int(entry["version_key"]),
        set_at=float(entry["set_at"]),
    )


def _record_of(state: dict[str, Any], hotkey: str) -> dict[str, Any]:
    record = next((r for r in state["neurons"] if r["hotkey"] == hotkey), None)
    if record is None:
        raise ChainError(f"hotkey {hotkey} is not registered on netuid {state['hyperparameters']['netuid']}")
    return record


def _prune_candidate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The neuron a new registration replaces: lowest stake, then oldest; validators are never pruned."""
    candidates = [r for r in records if not r["validator_permit"]]
    if not candidates:
        raise ChainError(f"subnet full: all {len(records)} uids hold a validator permit")
    return min(candidates, key=lambda r: (r["stake"], r["registration"]))


def _forget(state: dict[str, Any], pruned: dict[str, Any]) -> None:
    """Drop the weights the pruned hotkey set, and every weight set on its uid (they scored the old hotkey)."""
    state["weights"].pop(pruned["hotkey"], None)
    for entry in state["weights"].values():
        entry["weights"] = [[uid, value] for uid, value in entry["weights"] if uid != pruned["uid"]]


def _hotkey_of(keypair: object) -> str:
    if isinstance(keypair, str):
        return keypair
    address = getattr(keypair, "ss58_address", None)
    if not isinstance(address, str):
        raise ChainError(f"cannot tell the hotkey of {type(keypair).__name__}: it has no ss58_address")
    return address


def _check_stake(stake: float) -> None:
    if not math.isfinite(stake) or stake < 0:
        raise ChainError(f"stake must be finite and non-negative, got {stake}")
