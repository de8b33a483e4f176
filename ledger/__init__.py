"""A double-entry banking ledger served over HTTP, on PostgreSQL."""

__version__ = "0.1.0"
