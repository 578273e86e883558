# redisguard as a sidecar: runs as a non-root user, reads /etc/redisguard/redisguard.toml.
FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin redisguard
WORKDIR /app
COPY pyproject.toml README.md ./
COPY redisguard ./redisguard
RUN pip install --no-cache-dir . && rm -rf /root/.cache
COPY config/redisguard.toml config/users.acl /etc/redisguard/
USER 10001
EXPOSE 6380 9187
ENTRYPOINT ["redisguard"]
CMD ["serve", "--config", "/etc/redisguard/redisguard.toml"]
