"""The shipping service: one shipment per order, with a tracking number, cancellable in any order."""
