"""The audits' records (iota.orchestrator.audits): audits issued, failing verdicts awaiting confirmation, the
end-of-epoch audits still to serve, and the score log a resumed run carried over from its bucket."""

from __future__ import annotations

from iota.orchestrator.ledgers import keys
from iota.orchestrator.ledgers.keys import KeyValues
from iota.orchestrator.ledgers.records import AuditRecord, Claim, EndAuditQueue, ScoreArchive


class Audits:
    def __init__(self, kv: KeyValues):
        self.kv = kv

    def record(self, audit_id: str, audit: AuditRecord) -> None:
        self.kv.put(keys.audit(audit_id), audit.model_dump())

    def get(self, audit_id: str) -> AuditRecord | None:
        data = self.kv.get(keys.audit(audit_id))
        return None if data is None else AuditRecord.model_validate(data)

    # -- failing verdicts awaiting confirmation, by the audit id of the verdict ------------------------------

    def claims(self) -> dict[str, Claim]:
        return {
            audit_id: Claim.model_validate(claim)
            for audit_id, claim in self.kv.get(keys.CONFIRMATIONS, {}).items()
        }

    def put_claim(self, audit_id: str, claim: Claim) -> None:
        self._set_claims({**self.claims(), audit_id: claim})

    def drop_claim(self, audit_id: str) -> None:
        """The claim was confirmed or refuted (nothing happens if it was already)."""
        claims = self.claims()
        if claims.pop(audit_id, None) is not None:
            self._set_claims(claims)

    def _set_claims(self, claims: dict[str, Claim]) -> None:
        self.kv.put(keys.CONFIRMATIONS, {audit_id: claim.model_dump() for audit_id, claim in claims.items()})

    # -- end-of-epoch audits ---------------------------------------------------------------------------------

    def end_audits(self) -> EndAuditQueue:
        data = self.kv.get(keys.END_AUDITS)
        return EndAuditQueue() if data is None else EndAuditQueue.model_validate(data)

    def set_end_audits(self, queue: EndAuditQueue) -> None:
        self.kv.put(keys.END_AUDITS, queue.model_dump())

    # -- the score log ---------------------------------------------------------------------------------------

    def score_archive(self) -> ScoreArchive | None:
        data = self.kv.get(keys.SCORE_ARCHIVE)
        return None if data is None else ScoreArchive.model_validate(data)

    def set_score_archive(self, archive: ScoreArchive) -> None:
        self.kv.put(keys.SCORE_ARCHIVE, archive.model_dump())

    def scores_mirrored(self) -> int:
        """The last epoch whose score log was mirrored to the bucket (0: none yet)."""
        return int(self.kv.get(keys.SCORES_MIRRORED, 0))

    def set_scores_mirrored(self, epoch: int) -> None:
        self.kv.put(keys.SCORES_MIRRORED, epoch)
