"""Who may call which routes: miner, validator and operator checks, as FastAPI dependencies on the verified caller.

Each check reads its settings (``min_stake``, ``operator_hotkey``) from ``app.state.authenticator`` and refuses
with 403 and a coded detail (``not_registered``, ``no_validator_permit``, ``insufficient_stake``,
``not_operator``). Use the aliases as route parameters: ``async def report(caller: Miner) -> ...``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from iota.auth.verify import Authenticator, Caller, VerifiedCaller, reject


def _authenticator(request: Request) -> Authenticator:
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator


async def require_miner(caller: Caller) -> VerifiedCaller:
    """Any hotkey registered on the subnet (the operator's own hotkey only if it is registered too)."""
    if caller.neuron is None:
        reject(
            403,
            "not_registered",
            f"hotkey {caller.hotkey} is not registered on this subnet; register it first",
        )
    return caller


async def require_validator(caller: Caller, request: Request) -> VerifiedCaller:
    """A registered hotkey with a validator permit and at least the configured ``min_stake``."""
    neuron = caller.neuron
    if neuron is None:
        reject(403, "not_registered", f"hotkey {caller.hotkey} is not registered on this subnet")
    if not neuron.validator_permit:
        reject(
            403, "no_validator_permit", f"hotkey {caller.hotkey} (uid {neuron.uid}) has no validator permit"
        )
    min_stake = _authenticator(request).min_stake
    if neuron.stake < min_stake:
        message = f"hotkey {caller.hotkey} (uid {neuron.uid}) has stake {neuron.stake:g}; validators need {min_stake:g}"
        reject(403, "insufficient_stake", message, extra={"stake": neuron.stake, "min_stake": min_stake})
    return caller


async def require_operator(caller: Caller, request: Request) -> VerifiedCaller:
    """The run operator's hotkey, as configured; nobody when none is configured."""
    operator = _authenticator(request).operator_hotkey
    if operator is None:
        reject(
            403, "not_operator", "this server has no operator hotkey configured; operator routes are closed"
        )
    if caller.hotkey != operator:
        reject(403, "not_operator", f"hotkey {caller.hotkey} is not this run's operator")
    return caller


Miner = Annotated[VerifiedCaller, Depends(require_miner)]
Validator = Annotated[VerifiedCaller, Depends(require_validator)]
Operator = Annotated[VerifiedCaller, Depends(require_operator)]
