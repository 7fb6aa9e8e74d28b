# The lrsearch image: CPU PyTorch, lrsearch and optuna-dashboard. Used by docker-compose.yml
# for the tracking server, the workers and the dashboard.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# The image's own pip may be one with advisories (see the README's install): upgrade it first.
RUN pip install --upgrade pip
# CPU wheels: the default torch wheel on Linux pulls several GB of CUDA libraries.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY lrsearch ./lrsearch
COPY studies ./studies
RUN pip install ".[dashboard]"

RUN useradd --create-home lrsearch && mkdir -p /artifacts && chown lrsearch /artifacts
USER lrsearch
# Reports, and the server's login config (no secret in it), in the user's own folder.
ENV LRSEARCH_DATA=/home/lrsearch/lrsearch-data
