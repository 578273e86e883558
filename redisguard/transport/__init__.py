"""Row 6: sockets: listeners, client connections, TLS, PROXY-protocol listeners, a client's upstream link."""
