"""The `saga` command: starts, inspects and operates sagas over the orchestrator's public gRPC API."""
