"""The service layer: where money moves. No HTTP types here (see `ledger.http`)."""
