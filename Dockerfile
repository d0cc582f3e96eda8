FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY shared shared
COPY orders orders
COPY stock stock
COPY gateway gateway
COPY tooling tooling
# The pinned, hash-checked versions first; the project itself adds nothing beyond them.
RUN pip install --no-cache-dir --require-hashes -r requirements.lock \
    && pip install --no-cache-dir --no-deps . && useradd --system --uid 10001 app
USER app
ENV BIND_HOST=0.0.0.0 RUN_DIR=/tmp/run
