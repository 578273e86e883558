"""Row 0: Redis's wire protocol, sans-IO: RESP framing, the request reader (Redis's own grammar), the slicer, PROXY headers."""
