"""The durable saga orchestrator: definitions, engine, outbox dispatcher, store and gRPC API."""
