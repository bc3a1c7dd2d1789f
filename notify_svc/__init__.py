"""The notification service: one order confirmation per order, recorded and delivered exactly once."""
