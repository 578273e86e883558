# redisguard as a sidecar: runs as a non-root user, reads /etc/redisguard/redisguard.toml.
FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin redisguard
WORKDIR /app
COPY pyproject.toml README.md ./
COPY redisguard ./redisguard
RUN pip install --no-cache-dir . && rm -rf /root/.cache
COPY config/redisguard.toml config/users.acl /etc/redisguard/
# glibc gives each thread that allocates its own heap arena (up to 8 per core); the proxy is one event
# loop plus a few helper threads, and 2 arenas keep memory freed after connection bursts reusable
# (redisguard also calls malloc_trim(0) after connections close, see [limits] memory_trim_interval).
ENV MALLOC_ARENA_MAX=2
USER 10001
EXPOSE 6380 9187
ENTRYPOINT ["redisguard"]
CMD ["serve", "--config", "/etc/redisguard/redisguard.toml"]
