"""Row 7: redisguard as a client of Redis: the one-off upstream client, mirror users, cluster announce, the health check."""
