"""The inventory service: SKU stock and all-or-nothing reservations per order."""
