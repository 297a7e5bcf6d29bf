"""Reusable test helpers (KME simulator processes, PKI for tests)."""
