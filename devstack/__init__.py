"""The developer's local stack: process launcher, chaos harness, fault proxy, dev certificates and OTLP receiver."""
