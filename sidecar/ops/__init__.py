"""Operations: the admin API, the audit log, Prometheus metrics."""
