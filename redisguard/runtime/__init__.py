"""Row 8: one process's life: start-up, signals, drain, reload, file watch, supervisor and workers."""
