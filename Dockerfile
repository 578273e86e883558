# redisguard container image: non-root (uid 10001), installed from a wheelhouse built on the host with
# pinned dependencies, so the build needs no network (the host compiles redisguard's kernel into its
# wheel, for the image's Python 3.11; the build refuses a wheel without it):
#   python3 -m pip wheel . -w wheels -c constraints.txt
#   docker build -t redisguard .          (or: buildah bud --format docker -t redisguard .)
# Mount points (all read-only; the image ships no users and no certificates):
#   /etc/redisguard/redisguard.toml   the config (the shipped one expects the two below)
#   /etc/redisguard/users.acl         the users file
#   /etc/redisguard/certs/            server.pem, server.key (readable by uid 10001), ca.pem for client certs
# Ports: 6380 (TLS), 9187 (/metrics, /healthz, /readyz).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
COPY wheels/ /wheels/
COPY constraints.txt /wheels/
RUN python3 -m venv /opt/redisguard \
 && /opt/redisguard/bin/pip install --no-index --find-links /wheels -c /wheels/constraints.txt --no-cache-dir \
      --disable-pip-version-check -q redisguard \
 && /opt/redisguard/bin/pip uninstall -y -q pip setuptools
RUN /opt/redisguard/bin/redisguard --version | grep -q 'fast path: compiled' \
 || { echo "redisguard's wheel lacks the compiled kernel (build it where gcc and the Python headers are)" >&2; exit 1; }

FROM ${BASE}
RUN useradd --no-create-home --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin redisguard \
 && mkdir -p /etc/redisguard/certs /run/redisguard \
 && chown 10001:10001 /run/redisguard
COPY --from=build /opt/redisguard /opt/redisguard
COPY config/container/redisguard.toml /etc/redisguard/redisguard.toml
# glibc gives each thread that allocates its own heap arena (up to 8 per core); the proxy is one event
# loop plus a few helper threads, and 2 arenas keep memory freed after connection bursts reusable
# (redisguard also calls malloc_trim(0) after connections close, see [limits] memory_trim_interval).
ENV PATH=/opt/redisguard/bin:$PATH \
    REDISGUARD_CONFIG=/etc/redisguard/redisguard.toml \
    MALLOC_ARENA_MAX=2 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 6380 9187
# SIGTERM: /readyz 503, stop accepting, let clients finish (up to [server] drain_timeout, 25 s by default),
# cut the rest, exit. Docker kills after 10 s: stop with `docker stop -t 40` (compose: stop_grace_period: 40s).
STOPSIGNAL SIGTERM
# No curl in the image: Python's urllib (an HTTP error or no answer exits non-zero).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/opt/redisguard/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9187/readyz', timeout=3)"]
ENTRYPOINT ["redisguard"]
CMD ["serve"]
