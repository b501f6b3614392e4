# syntax=docker/dockerfile:1
# Airflow image of the docker-compose stack: apache/airflow + shoprank + the pinned lock.
#
#   docker compose build                      # via docker-compose.yml (TORCH_INDEX from .env)
#   docker build -t shoprank/airflow:local .  # plain build: PyPI's torch (CUDA build)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t shoprank/airflow:cpu .
FROM apache/airflow:3.3.2-python3.11

# Same convention as the Makefile: empty = PyPI's torch (the CUDA build, for GPU workers);
# https://download.pytorch.org/whl/cpu = the small CPU-only wheel.
ARG TORCH_INDEX=

# A Java runtime for Spark (the feedback path at shop scale, docs/scale.md): local mode inside a
# task, and the `spark` profile's master and worker, which run this same image.
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

# The base image installs Python packages as the unprivileged `airflow` user (uid 50000).
USER airflow
WORKDIR /opt/airflow

COPY --chown=airflow:0 requirements.txt constraints.txt /opt/shoprank/
COPY --chown=airflow:0 docker/airflow-requirements.txt /opt/shoprank/docker/

# 1) torch alone (constraints.txt deliberately leaves torch out; requirements.txt pins it),
# 2) everything else against the lock, plus the Celery executor and the PostgreSQL drivers.
RUN pip install --no-cache-dir --progress-bar off \
        ${TORCH_INDEX:+--extra-index-url "${TORCH_INDEX}"} \
        "$(grep -E '^torch==' /opt/shoprank/requirements.txt)" \
 && pip install --no-cache-dir --progress-bar off \
        -r /opt/shoprank/requirements.txt \
        -r /opt/shoprank/docker/airflow-requirements.txt \
        -c /opt/shoprank/constraints.txt

# 3) the project itself, without touching the dependencies installed above.
COPY --chown=airflow:0 pyproject.toml README.md /opt/shoprank/
COPY --chown=airflow:0 src /opt/shoprank/src
RUN pip install --no-cache-dir --progress-bar off --no-deps /opt/shoprank \
 && python -c "import shoprank, airflow.providers.celery, psycopg, asyncpg, torch"

# DAGs and plugins are baked in (so a worker on another node needs only the image);
# docker-compose.yml also mounts ./dags and ./plugins read-only over them for development.
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins

RUN mkdir -p /opt/airflow/shoprank
ENV SHOPRANK_HOME=/opt/airflow/shoprank \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

USER airflow
