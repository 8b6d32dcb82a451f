"""What a miner or validator speaks: the signed orchestrator client and the object transfers it makes."""

from iota.client.orchestrator import OrchestratorClient, Refused

__all__ = ["OrchestratorClient", "Refused"]
