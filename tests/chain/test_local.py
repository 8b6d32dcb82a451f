"""LocalChain: the chain's registration and weight rules, kept in one file shared by processes."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from bittensor.keyfiles import Keypair

from iota.chain.base import ChainError
from iota.chain.local import LocalChain, register_command
from iota.chain.weights import U16_MAX, normalize_weights


def key(name: str) -> Keypair:
    """A real sr25519 key, derived from a name so every run sees the same addresses."""
    return Keypair.create_from_uri(f"//iota-test-{name}")


COLD = key("cold").ss58_address


class Clock:
    """Wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def chain(tmp_path: Path, clock: Clock) -> LocalChain:
    return LocalChain(
        tmp_path / "chain.json", netuid=9, weights_rate_limit_s=60.0, max_neurons=8, clock=clock
    )


def test_register_gives_consecutive_uids_and_is_idempotent(chain: LocalChain):
    miner, validator = key("miner"), key("validator")
    first = chain.register(miner.ss58_address, COLD, stake=1.5)
    second = chain.register(validator.ss58_address, COLD, stake=100.0, validator_permit=True)
    assert (first.uid, second.uid) == (0, 1)
    assert second.validator_permit and not first.validator_permit
    again = chain.register(miner.ss58_address, COLD, stake=99.0, validator_permit=True)
    assert again == first  # unchanged: registering twice is not a way to change stake
    assert [n.hotkey for n in chain.neurons()] == [miner.ss58_address, validator.ss58_address]
    assert chain.neuron(validator.ss58_address) == second
    assert chain.neuron(key("stranger").ss58_address) is None


def test_register_refuses_bad_addresses_and_a_second_coldkey(chain: LocalChain):
    with pytest.raises(ChainError, match="not a valid ss58"):
        chain.register("miner-1", COLD)
    with pytest.raises(ChainError, match="not a valid ss58"):
        chain.register(key("m").ss58_address, "cold")
    chain.register(key("m").ss58_address, COLD)
    with pytest.raises(ChainError, match="already registered on uid 0"):
        chain.register(key("m").ss58_address, key("other-cold").ss58_address)
    with pytest.raises(ChainError, match="non-negative"):
        chain.register(key("n").ss58_address, COLD, stake=-1.0)
    assert len(chain.neurons()) == 1


def test_full_subnet_recycles_the_lowest_stake_non_validator(tmp_path: Path, clock: Clock):
    chain = LocalChain(tmp_path / "c.json", weights_rate_limit_s=0.0, max_neurons=4, clock=clock)
    validator = key("v")
    chain.register(
        validator.ss58_address, COLD, stake=0.0, validator_permit=True
    )  # lowest stake, but a validator
    rich = chain.register(key("rich").ss58_address, COLD, stake=50.0)
    poor = chain.register(key("poor").ss58_address, COLD, stake=1.0)
    middle = chain.register(key("middle").ss58_address, COLD, stake=10.0)
    chain.set_weights(validator, [rich.uid, poor.uid, middle.uid], [1.0, 1.0, 0.5], version_key=1)

    newcomer = chain.register(key("new").ss58_address, COLD)
    assert newcomer.uid == poor.uid
    assert chain.neuron(key("poor").ss58_address) is None
    assert chain.neurons()[poor.uid].hotkey == key("new").ss58_address
    assert len(chain.neurons()) == 4
    # The validator's weight on that uid was about the old hotkey: gone; the others stay.
    assert chain.weights_of(validator.ss58_address) == {rich.uid: U16_MAX, middle.uid: 32768}

    # Equal stakes: the older registration goes first; the newcomer (stake 0) now has the lowest stake.
    chain.set_stake(key("middle").ss58_address, 0.0)
    second = chain.register(key("new2").ss58_address, COLD)
    assert second.uid == middle.uid  # middle (stake 0, registered before newcomer)
    third = chain.register(key("new3").ss58_address, COLD)
    assert third.uid == newcomer.uid


def test_a_subnet_full_of_validators_refuses_registration(tmp_path: Path):
    chain = LocalChain(tmp_path / "c.json", max_neurons=2)
    chain.register(key("a").ss58_address, COLD, validator_permit=True)
    chain.register(key("b").ss58_address, COLD, validator_permit=True)
    with pytest.raises(ChainError, match="subnet full"):
        chain.register(key("c").ss58_address, COLD)


def test_the_pruned_validator_loses_its_weights(tmp_path: Path, clock: Clock):
    chain = LocalChain(tmp_path / "c.json", weights_rate_limit_s=0.0, max_neurons=2, clock=clock)
    keeper = key("keeper")
    chain.register(keeper.ss58_address, COLD, stake=5.0, validator_permit=True)
    demoted = key("demoted")
    chain.register(demoted.ss58_address, COLD, stake=1.0, validator_permit=True)
    chain.set_weights(demoted, [0, 1], [1.0, 1.0], version_key=0)
    chain.set_stake(demoted.ss58_address, 1.0, validator_permit=False)
    chain.register(key("replacement").ss58_address, COLD)
    assert chain.weights_entry(demoted.ss58_address) is None
    assert set(chain.weights()) == set()


def test_only_permitted_registered_hotkeys_set_weights(chain: LocalChain):
    miner, validator = key("miner"), key("validator")
    chain.register(miner.ss58_address, COLD)
    chain.register(validator.ss58_address, COLD, stake=10.0)
    with pytest.raises(ChainError, match="no validator permit"):
        chain.set_weights(validator, [0], [1.0], version_key=1)
    with pytest.raises(ChainError, match="not registered"):
        chain.set_weights(key("stranger"), [0], [1.0], version_key=1)
    chain.set_stake(validator.ss58_address, 10.0, validator_permit=True)
    chain.set_weights(validator, [0, 1], [1.0, 0.25], version_key=1)
    assert chain.weights_of(validator.ss58_address) == {0: U16_MAX, 1: round(0.25 * U16_MAX)}
    # The ss58 string works as well as a keypair: nothing is signed on one machine.
    assert chain.weights_of(miner.ss58_address) == {}


def test_rate_limit_is_per_hotkey(chain: LocalChain, clock: Clock):
    first, second = key("v1"), key("v2")
    for validator in (first, second):
        chain.register(validator.ss58_address, COLD, validator_permit=True)
    chain.set_weights(first, [0], [1.0], version_key=1)
    clock.now += 59.0
    with pytest.raises(ChainError, match="retry in 1.0 s"):
        chain.set_weights(first, [1], [1.0], version_key=1)
    chain.set_weights(second, [1], [1.0], version_key=1)  # another hotkey is not limited by the first
    assert chain.weights_of(first.ss58_address) == {0: U16_MAX}  # the refused call changed nothing
    clock.now += 1.0
    chain.set_weights(first, [1], [1.0], version_key=2)
    entry = chain.weights_entry(first.ss58_address)
    assert entry is not None
    assert entry.weights == {1: U16_MAX}
    assert entry.version_key == 2
    assert entry.set_at == clock.now


def test_weights_are_stored_normalised_with_their_version_key(chain: LocalChain):
    validator = key("v")
    for name in ("a", "b", "c"):
        chain.register(key(name).ss58_address, COLD)
    chain.register(validator.ss58_address, COLD, validator_permit=True)
    uids, weights = [0, 1, 2, 3], [0.2, 0.7, 0.0, 0.1]
    chain.set_weights(validator, uids, weights, version_key=42)
    expected = dict(zip(*normalize_weights(uids, weights), strict=True))
    assert chain.weights_of(validator.ss58_address) == expected
    assert 2 not in expected and max(expected.values()) == U16_MAX
    entry = chain.weights_entry(validator.ss58_address)
    assert entry is not None and entry.version_key == 42


@pytest.mark.parametrize(
    ("uids", "weights", "message"),
    [
        ([0, 1], [0.0, 0.0], "all weights are zero"),
        ([0, 5], [1.0, 1.0], r"uids not registered on the subnet: \[5\]"),
        ([0, 0], [1.0, 1.0], "duplicate uids"),
        ([0], [float("nan")], "finite"),
        ([0, 1], [1.0], "length"),
    ],
)
def test_bad_weight_vectors_are_refused(chain: LocalChain, uids, weights, message):
    validator = key("v")
    chain.register(key("m").ss58_address, COLD)
    chain.register(validator.ss58_address, COLD, validator_permit=True)
    with pytest.raises(ChainError, match=message):
        chain.set_weights(validator, uids, weights, version_key=1)
    assert chain.weights() == {}


def test_version_key_below_the_subnets_is_refused(tmp_path: Path):
    chain = LocalChain(tmp_path / "c.json", weights_version=7)
    validator = key("v")
    chain.register(validator.ss58_address, COLD, validator_permit=True)
    assert chain.weights_version() == 7
    with pytest.raises(ChainError, match="older than the subnet's 7"):
        chain.set_weights(validator, [0], [1.0], version_key=6)
    chain.set_weights(validator, [0], [1.0], version_key=7)


def test_two_instances_share_one_file(tmp_path: Path, clock: Clock):
    path = tmp_path / "shared.json"
    writer = LocalChain(path, netuid=3, weights_rate_limit_s=30.0, max_neurons=16, clock=clock)
    reader = LocalChain(path, clock=clock)  # unset hyperparameters: adopt the file's
    assert (reader.netuid, reader.weights_rate_limit_s, reader.max_neurons) == (3, 30.0, 16)
    validator = key("v")
    writer.register(validator.ss58_address, COLD, stake=2.0, validator_permit=True)
    assert reader.neuron(validator.ss58_address) is not None
    reader.set_weights(validator, [0], [1.0], version_key=1)
    # The rate limit lives in the file, not in the instance that set the weights.
    with pytest.raises(ChainError, match="rate limit is 30 s"):
        writer.set_weights(validator, [0], [1.0], version_key=1)
    assert writer.weights_of(validator.ss58_address) == {0: U16_MAX}
    with pytest.raises(ChainError, match="max_neurons=4 \\(file has 16\\)"):
        LocalChain(path, max_neurons=4)
    # A restart finds everything, and the directory holds no leftover temporary files.
    assert LocalChain(path).neurons() == writer.neurons()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.json", "shared.json.lock"]
    assert json.loads(path.read_text())["hyperparameters"]["netuid"] == 3


def test_corrupt_file_is_a_chain_error(tmp_path: Path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ChainError, match="not valid JSON"):
        LocalChain(path)


def test_register_command_creates_the_chain_and_updates_stake(tmp_path: Path):
    path = tmp_path / "sub" / "chain.json"
    hotkey = key("op").ss58_address
    neuron = register_command(path, hotkey, COLD, stake=3.0, validator=False)
    assert (neuron.uid, neuron.stake, neuron.validator_permit) == (0, 3.0, False)
    updated = register_command(path, hotkey, COLD, stake=7.0, validator=True)
    assert (updated.uid, updated.stake, updated.validator_permit) == (0, 7.0, True)
    assert LocalChain(path).neurons() == [updated]


CHILD = textwrap.dedent(
    """
    import sys
    from bittensor.keyfiles import Keypair
    from iota.chain.local import LocalChain

    chain = LocalChain(sys.argv[1])
    cold = Keypair.create_from_uri("//iota-test-cold").ss58_address
    hotkeys = [Keypair.create_from_uri(f"//iota-test-child-{i}").ss58_address for i in range(int(sys.argv[2]))]
    print("ready", flush=True)
    for i, hotkey in enumerate(hotkeys):
        chain.register(hotkey, cold, stake=float(i))
    """
)


def test_a_subprocess_registers_while_the_parent_registers_and_reads(tmp_path: Path):
    path = tmp_path / "chain.json"
    chain = LocalChain(path, max_neurons=1024)
    child_count = 60
    children = {key(f"child-{i}").ss58_address: float(i) for i in range(child_count)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(child_count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    parent_count = 0
    children_seen = []  # how many of the child's registrations each parent read saw
    while child.poll() is None or parent_count < 20:
        chain.register(key(f"parent-{parent_count}").ss58_address, COLD)
        parent_count += 1
        children_seen.append(sum(n.hotkey in children for n in chain.neurons()))
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr

    neurons = chain.neurons()
    assert len(neurons) == child_count + parent_count  # no registration lost to a race
    assert [n.uid for n in neurons] == list(range(len(neurons)))
    assert len({n.hotkey for n in neurons}) == len(neurons)
    assert {n.hotkey: n.stake for n in neurons if n.hotkey in children} == children
    # The two processes really interleaved: the parent saw the child part-way through.
    assert any(0 < seen < child_count for seen in children_seen)
    assert children_seen == sorted(children_seen)
