"""Row 1: the command table (COMMAND INFO) and key extraction from key specs."""
