"""The payment service: one charge per order, full refunds, and a ledger of every movement of money."""
