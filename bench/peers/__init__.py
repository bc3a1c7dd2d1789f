"""Peer engines running the same order saga against the same four services, for side-by-side figures."""
