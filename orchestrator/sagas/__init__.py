"""The saga definitions the orchestrator ships with."""
