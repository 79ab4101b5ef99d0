# syntax=docker/dockerfile:1
#
# Airflow image for the docker compose stack (docker/compose.yaml): the official Apache Airflow image plus
# airflow-llmops[all], installed from the same lock as scripts/bootstrap.sh. Build from the repository root:
#
#   docker build -f docker/airflow.Dockerfile -t airflow-llmops-airflow:dev .
#
# Keep the tag's Airflow version and Python version equal to apache-airflow== and --python-version in
# requirements/lock.txt (tests/unit/test_docker.py checks both).
FROM apache/airflow:3.3.2-python3.11

# Must equal TORCH_VERSION in scripts/bootstrap.sh (checked by tests/unit/test_docker.py).
ARG TORCH_VERSION=2.13.0
# torch comes from this index, with pip, before everything else: the CPU build. A resolver asked for plain
# torch fetches the multi-GB CUDA build and the nvidia-* packages the lock names.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# The official image keeps Python packages in the airflow user's virtualenv ($VIRTUAL_ENV=~/.local) and
# expects them installed as that user, never as root.
USER airflow

COPY --chown=airflow:0 pyproject.toml README.md /home/airflow/airflow-llmops/
COPY --chown=airflow:0 requirements/ /home/airflow/airflow-llmops/requirements/
WORKDIR /home/airflow/airflow-llmops

# uv ships with the official image; install it only if a base image lacks it.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && (command -v uv >/dev/null 2>&1 || pip install --no-cache-dir "uv>=0.5")

COPY --chown=airflow:0 airflow_llmops/ /home/airflow/airflow-llmops/airflow_llmops/

# One uv install with the lock as constraints (as in scripts/bootstrap.sh): the CPU torch above already
# satisfies torch==$TORCH_VERSION, so uv keeps it. The lock also pins apache-airflow to the image's version.
RUN --mount=type=cache,target=/tmp/llmops-uv-cache,uid=50000 \
    UV_CACHE_DIR=/tmp/llmops-uv-cache UV_LINK_MODE=copy \
    uv pip install -c requirements/lock.txt ".[all]" \
 && python -c "import airflow_llmops, torch; print('airflow-llmops', airflow_llmops.__version__, 'torch', torch.__version__)"

COPY --chown=airflow:0 dags/ /opt/airflow/dags/

# Mount point of the compose stack's llmops-shared volume (the local platform's jobs and endpoints): created here
# by the airflow user, so Docker gives a new volume this owner instead of root.
RUN mkdir -p /opt/airflow/shared/jobs /opt/airflow/shared/endpoints

WORKDIR /opt/airflow
