"""The loyalty service: a gRPC participant outside the suite, built by the tests from its own proto."""
