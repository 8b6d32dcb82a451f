"""Butterfly merge traffic and time per miner for N = 2..16 replicas of one stage, through a byte-counting store.

Why per-miner traffic does not grow with N (W = the stage's fp32 size, P partitions fixed for the run, 2 owners
per partition, so each miner owns 2P/N partitions; P = 256 makes 2P/N exact for N = 2, 4, 8, 16):

    down = 2P/N partitions x N uploads x W/P      (its slice of every pseudo-gradient)  = 2W
         + 2P/N x 2 x W/P                         (previous weights and momentum of its slices) = 4W/N
         + W                                      (APPLY: every merged slice)
    up   = W                                      (its own pseudo-gradient)
         + 2P/N x 2 x W/P                         (merged weights and momentum of its slices) = 4W/N

so a miner moves 4W + 8W/N bytes: 6W at N = 4, 4.5W at N = 16 (it falls as N grows). Each size probe (the last
value of an upload plus one byte, 4 bytes served) adds 8P bytes per miner, negligible. What does grow with N is the
number of requests per miner (2P/N x (2N + 2) range reads + P merged-slice reads), which is printed too.

Run: python bench/merge.py [--params 4000000] [--partitions 256] [--replicas 2 4 8 16]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from iota.merge import (
    DictStore,
    FlatRef,
    OuterConfig,
    Submitter,
    apply_merged,
    make_plan,
    partition_bounds,
    pseudo_gradient,
    run_owner,
    squared_norm,
)
from iota.model.flat import encode_f32

MB = 1e6


@dataclass
class Row:
    replicas: int
    owned: int  # partitions per miner (max)
    down_mean: float
    down_max: float
    up_mean: float
    up_max: float
    total_max: float
    requests_max: int
    merge_s_max: float  # slowest owner's merge
    wall_s: float  # the whole merge and apply, all miners one after another


def run(n_params: int, n_partitions: int, replicas: int, seed: int = 0) -> Row:
    gen = torch.Generator().manual_seed(seed)
    store = DictStore()
    start = torch.randn(n_params, generator=gen)
    store.put(
        "start", encode_f32(start)
    )  # last epoch's merged weights and momentum (the orchestrator's writes)
    store.put("momentum", encode_f32(torch.randn(n_params, generator=gen) * 0.01))
    miners = [f"miner{i:02d}" for i in range(replicas)]
    submitters = []
    for hotkey in miners:
        end = start + torch.randn(n_params, generator=gen) * 0.01
        grad = pseudo_gradient(start, end)
        store.for_caller(hotkey).put(f"grads/{hotkey}", encode_f32(grad))
        submitters.append(
            Submitter(
                hotkey=hotkey,
                upload_key=f"grads/{hotkey}",
                weight=1.0,
                claimed_norm=math.sqrt(squared_norm(grad)),
            )
        )
    n = len(partition_bounds(n_params, n_partitions))
    plan = make_plan(
        run="bench",
        epoch=5,
        stage=1,
        n_params=n_params,
        n_partitions=n_partitions,
        submitters=submitters,
        prev_weights=[FlatRef(key="start")] * n,
        prev_momentum=[FlatRef(key="momentum")] * n,
        outer=OuterConfig(),
    )

    t0 = time.perf_counter()
    merge_times = []
    digests: dict[int, set[str]] = {}
    for hotkey in miners:
        t = time.perf_counter()
        owner = run_owner(store.for_caller(hotkey), plan, hotkey)
        merge_times.append(time.perf_counter() - t)
        assert not owner.failed, owner.failed
        for index, result in owner.results.items():
            digests.setdefault(index, set()).add(result.digest)
    assert all(len(d) == 1 for d in digests.values()), "owners disagree"
    accepted = {p.index: plan.output_key(p.index, p.owners[0], "weights") for p in plan.partitions}
    applied = [apply_merged(store.for_caller(hotkey), plan, accepted) for hotkey in miners]
    wall = time.perf_counter() - t0
    assert all(torch.equal(a, applied[0]) for a in applied), "replicas differ after APPLY"

    down = [store.served[h] for h in miners]
    up = [store.received[h] for h in miners]
    return Row(
        replicas=replicas,
        owned=max(len(plan.partitions_of(h)) for h in miners),
        down_mean=sum(down) / replicas,
        down_max=max(down),
        up_mean=sum(up) / replicas,
        up_max=max(up),
        total_max=max(d + u for d, u in zip(down, up, strict=True)),
        requests_max=max(store.requests[h] for h in miners),
        merge_s_max=max(merge_times),
        wall_s=wall,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=4_000_000)
    parser.add_argument("--partitions", type=int, default=256)
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8, 16])
    args = parser.parse_args()
    stage_bytes = args.params * 4
    print(
        f"stage: {args.params:,} params = W = {stage_bytes / MB:.1f} MB fp32, P = {args.partitions} partitions"
    )
    header = (
        f"{'N':>3} {'parts/miner':>11} {'down mean MB':>12} {'down max MB':>11} {'up mean MB':>10} "
        f"{'up max MB':>9} {'total max':>12} {'requests':>8} {'merge s':>7} {'wall s':>6}"
    )
    print(header)
    rows = {}
    for replicas in args.replicas:
        row = run(args.params, args.partitions, replicas)
        rows[replicas] = row
        print(
            f"{row.replicas:>3} {row.owned:>11} {row.down_mean / MB:>12.1f} {row.down_max / MB:>11.1f} "
            f"{row.up_mean / MB:>10.1f} {row.up_max / MB:>9.1f} {row.total_max / stage_bytes:>10.2f} W "
            f"{row.requests_max:>8} {row.merge_s_max:>7.2f} {row.wall_s:>6.2f}"
        )
    if 4 in rows and 16 in rows:
        ratio = rows[16].total_max / rows[4].total_max
        print(f"max per-miner traffic N=16 / N=4: {ratio:.3f}")
        assert ratio <= 1.1, f"per-miner traffic grew with N: {ratio:.3f}"


if __name__ == "__main__":
    main()
