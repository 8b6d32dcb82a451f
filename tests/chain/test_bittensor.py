"""BittensorChain without a network: metagraph mapping, lazy sync, set_weights retries, and no eager connection."""

import socket
import threading
from types import SimpleNamespace

import bittensor as bt
import numpy as np
import pytest
from bittensor.keyfiles import Keypair
from bittensor.metagraph import _build as build_metagraph  # the SDK's own decoder of the runtime record

from iota.chain.base import ChainError, Neuron
from iota.chain.bittensor import BittensorChain, neurons_from_metagraph

HOT = [Keypair.create_from_uri(f"//iota-test-hot-{i}").ss58_address for i in range(3)]
COLD = [Keypair.create_from_uri(f"//iota-test-cold-{i}").ss58_address for i in range(3)]


def row(uid: int, stake: object, permit: bool) -> SimpleNamespace:
    return SimpleNamespace(
        uid=uid, hotkey=HOT[uid], coldkey=COLD[uid], total_stake=stake, validator_permit=permit
    )


def fake_metagraph() -> SimpleNamespace:
    return SimpleNamespace(
        neurons=[row(0, 1.5, False), row(1, np.float64(1000.0), True), row(2, None, False)]
    )


EXPECTED = [
    Neuron(uid=0, hotkey=HOT[0], coldkey=COLD[0], stake=1.5, validator_permit=False),
    Neuron(uid=1, hotkey=HOT[1], coldkey=COLD[1], stake=1000.0, validator_permit=True),
    Neuron(uid=2, hotkey=HOT[2], coldkey=COLD[2], stake=0.0, validator_permit=False),
]


def test_mapping_from_metagraph_like_rows():
    assert neurons_from_metagraph(fake_metagraph()) == EXPECTED


def test_mapping_reads_balances_in_whole_units():
    metagraph = SimpleNamespace(neurons=[row(0, bt.Balance.from_rao(2_500_000_000, 9), True)])
    assert neurons_from_metagraph(metagraph)[0].stake == 2.5


def test_mapping_of_the_sdks_own_metagraph_decoded_from_a_runtime_record():
    record = {
        "hotkeys": HOT,
        "coldkeys": COLD,
        "active": [True, True, False],
        "validator_permit": [False, True, False],
        "total_stake": [1_500_000_000, 1_000 * 10**9, 0],
        "alpha_stake": [1_000_000_000, 900 * 10**9, 0],
        "tao_stake": [0, 50 * 10**9, 0],
        "block": 100,
        "tempo": 360,
        "last_step": 90,
        "blocks_since_last_step": 10,
        "owner_hotkey": HOT[1],
        "owner_coldkey": COLD[1],
        "network_registered_at": 1,
    }
    metagraph = build_metagraph(9, record, {})
    assert isinstance(metagraph, bt.Metagraph)
    assert neurons_from_metagraph(metagraph) == [
        Neuron(uid=0, hotkey=HOT[0], coldkey=COLD[0], stake=1.5, validator_permit=False),
        Neuron(uid=1, hotkey=HOT[1], coldkey=COLD[1], stake=1000.0, validator_permit=True),
        Neuron(uid=2, hotkey=HOT[2], coldkey=COLD[2], stake=0.0, validator_permit=False),
    ]


class FakeSubtensor:
    """Stands in for bt.Subtensor: records calls, answers from scripted outcomes."""

    def __init__(self, metagraphs=(), outcomes=()):
        self.metagraphs = list(metagraphs)  # each: a metagraph, None, or an exception to raise
        self.outcomes = list(outcomes)  # each: an ExtrinsicResult or an exception to raise
        self.metagraph_calls = 0
        self.executed = []  # (intent, signer, kwargs)
        self.closed = False
        self.subnets = SimpleNamespace(metagraph=self._metagraph)

    def _metagraph(self, netuid, commitments=True):
        self.metagraph_calls += 1
        answer = self.metagraphs.pop(0) if len(self.metagraphs) > 1 else self.metagraphs[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def execute(self, intent, wallet, **kwargs):
        self.executed.append((intent, wallet, kwargs))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def close(self):
        self.closed = True


def chain_with(fake: FakeSubtensor, **kwargs) -> BittensorChain:
    networks = []

    def factory(network: str) -> FakeSubtensor:
        networks.append(network)
        return fake

    chain = BittensorChain("test", 9, subtensor_factory=factory, **{"backoff_s": 0.0, **kwargs})
    assert networks == []  # built lazily
    return chain


def test_construction_does_not_touch_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network touched during construction")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    threads = threading.active_count()
    chain = BittensorChain("finney", 9, sync_interval_s=100.0, wallet_for_weights="validator/default")
    assert (chain.network, chain.netuid) == ("finney", 9)
    assert threading.active_count() == threads  # not even the SDK's event-loop thread
    BittensorChain("wss://example.invalid:443", 9)


def test_unknown_network_is_refused_at_construction():
    with pytest.raises(ChainError, match="Unknown network 'finny'"):
        BittensorChain("finny", 9)


def test_neurons_sync_lazily_on_the_interval():
    fake = FakeSubtensor(metagraphs=[fake_metagraph()])
    chain = chain_with(fake, sync_interval_s=3600.0)
    assert chain.neurons() == EXPECTED
    assert chain.neuron(HOT[1]) == EXPECTED[1]
    assert fake.metagraph_calls == 1  # the second read came from the cache
    chain.sync()
    assert fake.metagraph_calls == 2

    always = FakeSubtensor(metagraphs=[fake_metagraph()])
    eager = chain_with(always, sync_interval_s=0.0)
    eager.neurons()
    eager.neurons()
    assert always.metagraph_calls == 2


def test_a_failed_resync_serves_the_previous_registry_but_a_first_failure_raises():
    error = bt.RpcConnectionError("could not connect to any endpoint")
    fake = FakeSubtensor(metagraphs=[fake_metagraph(), error])
    chain = chain_with(fake, sync_interval_s=0.0)
    assert chain.neurons() == EXPECTED
    assert chain.neurons() == EXPECTED  # re-sync failed: previous registry
    with pytest.raises(ChainError, match="could not connect"):
        chain.sync()  # an explicit sync says so

    cold = chain_with(FakeSubtensor(metagraphs=[error]))
    with pytest.raises(ChainError, match="metagraph of netuid 9 on test: could not connect"):
        cold.neurons()
    missing = chain_with(FakeSubtensor(metagraphs=[None]))
    with pytest.raises(ChainError, match="netuid 9 does not exist"):
        missing.neurons()


def test_set_weights_builds_the_sdk_intent_and_signs_with_the_given_keypair():
    fake = FakeSubtensor(outcomes=[bt.ExtrinsicResult(success=True)])
    chain = chain_with(fake)
    signer = Keypair.create_from_uri("//iota-test-validator")
    chain.set_weights(signer, [2, 0], [0.25, 1.0], version_key=5)
    ((intent, wallet, kwargs),) = fake.executed
    assert isinstance(intent, bt.SetWeights)
    assert (intent.netuid, intent.uids, intent.weights, intent.version_key) == (9, [2, 0], [0.25, 1.0], 5)
    assert wallet is signer
    assert kwargs["wait_for_inclusion"] is True


def test_wallet_for_weights_signs_instead_of_the_keypair():
    fake = FakeSubtensor(outcomes=[bt.ExtrinsicResult(success=True)])
    chain = chain_with(fake, wallet_for_weights="validator/hot")
    chain.set_weights(None, [0], [1.0], version_key=0)
    assert fake.executed[0][1] == "validator/hot"
    with pytest.raises(ChainError, match="no wallet"):
        chain_with(FakeSubtensor()).set_weights(None, [0], [1.0], version_key=0)


def test_transient_failures_are_retried():
    fake = FakeSubtensor(
        outcomes=[
            bt.RpcConnectionError("socket closed"),
            bt.ExtrinsicResult(
                success=False, error=bt.ChainError("Priority is too low", code=bt.ErrorCode.UNKNOWN)
            ),
            bt.ExtrinsicResult(success=True),
        ]
    )
    chain_with(fake, retries=3).set_weights("5F", [0], [1.0], version_key=0)
    assert len(fake.executed) == 3


def test_final_failure_carries_the_chains_message():
    fake = FakeSubtensor(outcomes=[TimeoutError("no answer")] * 3)
    with pytest.raises(ChainError, match="set_weights failed after 3 attempts: no answer"):
        chain_with(fake, retries=2).set_weights("5F", [0], [1.0], version_key=0)
    assert len(fake.executed) == 3


@pytest.mark.parametrize(
    "refusal",
    [
        bt.ChainError("Neuron has no validator permit", name="NeuronNoValidatorPermit"),
        bt.ChainError("Hotkey is not registered on subnet 9", code=bt.ErrorCode.NOT_REGISTERED),
        bt.ChainError("Rate limited: wait 42 more blocks", code=bt.ErrorCode.RATE_LIMITED),
    ],
)
def test_refusals_are_not_retried(refusal):
    fake = FakeSubtensor(outcomes=[bt.ExtrinsicResult(success=False, error=refusal)])
    with pytest.raises(ChainError, match=f"set_weights refused: {refusal.message}"):
        chain_with(fake, retries=3).set_weights("5F", [0], [1.0], version_key=0)
    assert len(fake.executed) == 1


def test_bad_weights_are_refused_before_any_call():
    fake = FakeSubtensor()
    chain = chain_with(fake)
    for uids, weights in (([0, 0], [1.0, 1.0]), ([0], [float("nan")]), ([0, 1], [0.0, 0.0])):
        with pytest.raises(ChainError):
            chain.set_weights("5F", uids, weights, version_key=0)
    assert fake.executed == []


def test_close_closes_an_opened_client_only():
    fake = FakeSubtensor(metagraphs=[fake_metagraph()])
    chain = chain_with(fake)
    chain.close()
    assert not fake.closed
    chain.neurons()
    chain.close()
    assert fake.closed


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_real_sdk_against_an_unreachable_endpoint_fails_as_chain_errors():
    chain = BittensorChain(f"ws://127.0.0.1:{closed_port()}", 9, retries=1, backoff_s=0.0)
    try:
        with pytest.raises(ChainError, match="could not connect"):
            chain.neurons()
        with pytest.raises(ChainError, match="set_weights failed after 2 attempts: could not connect"):
            chain.set_weights(Keypair.create_from_uri("//iota-test-validator"), [0], [1.0], version_key=0)
    finally:
        chain.close()
