"""Operations: ``health`` (the health file and its check), ``metrics`` (Prometheus), ``logs``
(plain or JSON), ``supervisor`` (one process per GPU), ``reconciler`` (lost messages, expired
leases) and ``quarantine`` (a re-run job runs alone)."""
