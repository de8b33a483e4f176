"""HTTP: thin handlers that decode, call the service, encode. No SQL here."""
