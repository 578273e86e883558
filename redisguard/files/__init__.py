"""Row 0: reading the files we load (once, stable, bounded) and one-line answers to why a file cannot be opened."""
