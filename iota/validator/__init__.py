"""The validator daemon: draws audits from the orchestrator, runs them with iota.audit, posts verdicts, sets weights."""
