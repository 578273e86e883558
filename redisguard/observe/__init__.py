"""Row 5: what the session reports, turned into Prometheus metrics, audit lines and the traffic profile."""
