# paypoll's image: the worker by default; the sandbox from the same image (docker-compose.yml).
#   docker build -t paypoll .
#   docker run --rm -e PAYPOLL_REDIS_URL=redis://redis:6379/0 -e PAYPOLL_CLIENT_ID=... \
#     -e PAYPOLL_CLIENT_SECRET=... paypoll                   # = paypoll worker
# Two stages: the builder makes wheels (paypoll's, with its .lua package data, and its
# dependencies'); the final stage installs them with no compiler, no pip cache, as a non-root user.

FROM python:3.11-slim AS builder
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin paypoll
COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-index --find-links=/tmp/wheels paypoll && rm -rf /tmp/wheels
COPY config/accounts.example.toml config/.env.example /etc/paypoll/

# The container is the network boundary: bind the metrics endpoint on every interface so
# Prometheus can reach it; publish the port only where you mean to.
ENV PAYPOLL_METRICS_HOST=0.0.0.0 \
    PAYPOLL_METRICS_PORT=9191 \
    PAYPOLL_LOG_FORMAT=json
EXPOSE 9191
USER paypoll
WORKDIR /home/paypoll

# Healthy while the fleet's supervisor serves /metrics (a worker run with --no-metrics, or
# the sandbox, needs its own healthcheck: see docker-compose.yml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('PAYPOLL_METRICS_PORT', '9191'), timeout=4)"]

# SIGTERM (docker stop) makes the fleet finish running steps; give it the time it needs:
# docker stop -t 40, or stop_grace_period in compose.
STOPSIGNAL SIGTERM
CMD ["paypoll", "worker"]
