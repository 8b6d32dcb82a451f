"""Pathway attribution aims the audits: a miner whose samples lose more than its stage-mates' is audited next,
before any draw, once per epoch; the hops come from the real scheduler over the orchestrator's own state."""

from __future__ import annotations

import random
from pathlib import Path

from bittensor.keyfiles import Keypair

from iota.orchestrator.scheduler import FORWARD
from iota.orchestrator.state import Hop
from iota.protocol import AuditTask
from tests.security import serve_net
from tests.support.hops import complete_next

# Registered in this order, they take stages 0, 1, 2, 0, 1, 2.
NAMES = ("head", "mid", "tail", "idle", "stranger", "cold")


def test_a_miner_whose_samples_lose_more_is_audited_next(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path
) -> None:
    with serve_net(data_dir, keypairs, tmp_path, samples_per_epoch=80) as net:
        sched, state = net.orch.scheduler, net.orch.state
        hotkeys = [keypairs[name].ss58_address for name in NAMES]
        cheat = keypairs["idle"].ss58_address
        now = net.clock()
        for hotkey in hotkeys:
            sched.register(hotkey, None, "cpu", 1 << 40, "s0", now)
        assert [state.miner(h).stage for h in hotkeys] == [0, 1, 2, 0, 1, 2]  # type: ignore[union-attr]
        rng, heads = random.Random(0), dict[int, str]()

        def tail_loss(hop: Hop) -> float:  # the cheat's samples end 1 nat worse
            return 5.0 + 0.1 * rng.random() + (1.0 if heads[hop.sample_id] == cheat else 0.0)

        while int(state.get("samples_completed", 0)) < 48:
            now += 0.01
            hotkey = rng.choice(hotkeys)
            leased = complete_next(sched, hotkey, now, tail_loss)
            if leased is not None and leased.direction == FORWARD and leased.stage == 0:
                heads[leased.sample_id] = hotkey
        response = net.signed("validator", "/validators/audit")
        assert response.status_code == 200, response.text
        assert AuditTask.model_validate_json(response.content).miner == cheat
        (event,) = net.events("audit_targeted")
        assert event["hotkey"] == cheat and event["epoch"] == 0
        # once per epoch: the next audits are drawn, and the screen names nobody else
        for _ in range(3):
            response = net.signed("validator2", "/validators/audit")
            assert response.status_code == 200, response.text
        assert len(net.events("audit_targeted")) == 1
