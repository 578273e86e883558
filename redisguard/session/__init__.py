"""Row 4: the per-client state machine, sans-IO: bytes in, bytes out and effects."""
