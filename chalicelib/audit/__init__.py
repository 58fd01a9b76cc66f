"""The tamper-evident audit trail: canonical JSON, a hash chain per run, verification."""
