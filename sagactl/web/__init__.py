"""The `saga web` console: a Starlette app that shows and operates sagas through the orchestrator's public gRPC API."""
