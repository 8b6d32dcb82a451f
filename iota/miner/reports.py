"""A miner's two kinds of report, built in one place: a hop's (iota.miner.hops) and phase work's (iota.miner.phases)."""

from __future__ import annotations

from iota.model import wire
from iota.protocol import PhaseReport, PhaseResult, Report, WeightSketch, Work


def hop_report(
    work: Work,
    inner_step: int,
    *,
    input: bytes | None,
    output: bytes | None,
    loss: float | None,
    tokens: int,
    sketch: WeightSketch | None,
) -> Report:
    """The report of a forward or backward hop, done up to `inner_step`: the digests of what it read and wrote."""
    assert work.hop_id is not None
    output_sha256, output_md5 = _digests(output)
    return Report(
        run_id=work.run_id,
        epoch=work.epoch,
        hop_id=work.hop_id,
        inner_step=inner_step,
        input_sha256=wire.sha256(input) if input is not None else None,
        output_sha256=output_sha256,
        output_md5=output_md5,
        loss=loss,
        tokens=tokens,
        sketch=sketch,
    )


def phase_report(
    work: Work,
    inner_step: int,
    result: PhaseResult,
    *,
    input_sha256: str | None = None,
    output: bytes | None = None,
    kept_sha256: str | None = None,
) -> PhaseReport:
    """The report of phase work or a snapshot answer. `output`: the bytes it uploaded, named by their SHA-256 and
    their MD5 (which the orchestrator checks against the bucket's). `kept_sha256`: the digest of an output kept
    here and never uploaded (the weights an `apply` loaded), so it has no MD5."""
    output_sha256, output_md5 = _digests(output)
    return PhaseReport(
        run_id=work.run_id,
        epoch=work.epoch,
        inner_step=inner_step,
        result=result,
        input_sha256=input_sha256,
        output_sha256=output_sha256 or kept_sha256,
        output_md5=output_md5,
    )


def _digests(output: bytes | None) -> tuple[str | None, str | None]:
    if output is None:
        return None, None
    return wire.sha256(output), wire.md5_hex(output)
