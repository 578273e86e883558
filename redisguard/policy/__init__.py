"""Row 3: the one decision (may this user run this request?), the per-user plan for the hot path, source and login guards."""
