"""Row 9: every command-line tool: serve, check-config, certs, acl, demo, firewall, audit-upstream."""
