"""The chain lookup behind every request's auth: the registry is read once per interval, whatever the callers ask."""

from __future__ import annotations

from pathlib import Path

from bittensor.keyfiles import Keypair

from iota.chain.base import Neuron
from iota.chain.local import LocalChain
from iota.orchestrator.assembly import cached_lookup


class CountingChain(LocalChain):
    """A real chain file that counts how often its whole registry is read."""

    reads = 0

    def neurons(self) -> list[Neuron]:
        self.reads += 1
        return super().neurons()


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def hotkey() -> str:
    return str(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()).ss58_address)


def test_registered_hotkeys_cost_one_read_per_interval(tmp_path: Path) -> None:
    chain, clock = CountingChain(tmp_path / "chain.json"), Clock()
    miners = [hotkey() for _ in range(3)]
    for h in miners:
        chain.register(h, h)
    lookup = cached_lookup(chain, ttl_s=5.0, miss_refresh_s=1.0, clock=clock)
    for _ in range(50):
        assert all(lookup(h) is not None for h in miners)
    assert chain.reads == 1
    clock.now += 5.1
    assert lookup(miners[0]) is not None
    assert chain.reads == 2


def test_a_flood_of_unregistered_hotkeys_costs_one_read_per_second(tmp_path: Path) -> None:
    chain, clock = CountingChain(tmp_path / "chain.json"), Clock()
    lookup = cached_lookup(chain, ttl_s=5.0, miss_refresh_s=1.0, clock=clock)
    strangers = [hotkey() for _ in range(20)]
    assert all(lookup(h) is None for h in strangers)
    assert chain.reads == 1
    clock.now += 1.0
    assert all(lookup(h) is None for h in strangers)
    assert chain.reads == 2


def test_a_new_registration_is_known_within_the_miss_interval(tmp_path: Path) -> None:
    chain, clock = CountingChain(tmp_path / "chain.json"), Clock()
    lookup = cached_lookup(chain, ttl_s=60.0, miss_refresh_s=1.0, clock=clock)
    newcomer = hotkey()
    assert lookup(newcomer) is None
    chain.register(newcomer, newcomer)
    assert lookup(newcomer) is None  # within the second: not read again
    clock.now += 1.0
    neuron = lookup(newcomer)
    assert neuron is not None and neuron.hotkey == newcomer
