"""Tests of the miner: the I/O pipeline beside its compute, and the daemon against a real orchestrator in-process."""
