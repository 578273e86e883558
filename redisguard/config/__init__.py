"""Row 0: the configuration: every option declared once, parsed from a dict."""
