"""HTTP routes, one module per resource; each handler translates HTTP to one Orchestrator call."""
