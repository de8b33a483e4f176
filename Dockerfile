# The ledger service. PostgreSQL runs in its own container (see docker-compose.yml).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LEDGER_DATA_DIR=/var/lib/ledger

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY ledger ./ledger
COPY migrations ./migrations
# Editable install: the migrations directory stays beside the package, where
# `ledger migrate` looks for it. The data directory (chain keys, checkpoints, the first
# admin key) belongs to the unprivileged user the service runs as.
RUN pip install -e . && useradd --system --no-create-home ledger \
    && mkdir -p /var/lib/ledger && chown ledger /var/lib/ledger && chmod 700 /var/lib/ledger
USER ledger
VOLUME /var/lib/ledger

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status != 200)"
CMD ["ledger", "serve", "--host", "0.0.0.0", "--port", "8000"]
