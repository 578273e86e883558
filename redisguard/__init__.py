"""redisguard: a TLS-terminating, ACL-enforcing proxy in front of Redis."""

__version__ = "0.1.0"
