# One image for every process of the suite; compose.yaml's `command` picks which one a container runs
# (inventory-svc, payment-svc, shipping-svc, notify-svc, sagasuite-orchestrator, or the saga CLI).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    DATA_DIR=/var/lib/sagasuite

# The processes run as this unprivileged user; DATA_DIR is the only place they write to.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin sagasuite \
    && mkdir -p /var/lib/sagasuite \
    && chown sagasuite:sagasuite /var/lib/sagasuite

WORKDIR /build
# Third-party dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -r requirements.txt

# Then the project itself (the generated contracts, the shared kit, the orchestrator, the saga CLI, the local stack and the services).
COPY README.md ./
COPY sagasuite ./sagasuite
COPY svckit ./svckit
COPY orchestrator ./orchestrator
COPY sagactl ./sagactl
COPY devstack ./devstack
COPY conformance ./conformance
COPY inventory_svc ./inventory_svc
COPY payment_svc ./payment_svc
COPY shipping_svc ./shipping_svc
COPY notify_svc ./notify_svc
RUN pip install --no-deps . \
    && cd / && rm -rf /build

WORKDIR /var/lib/sagasuite
USER sagasuite:sagasuite

# No entry point: compose.yaml gives each container its console script as the command.
ENTRYPOINT []
CMD ["saga", "--help"]
