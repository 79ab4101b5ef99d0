# syntax=docker/dockerfile:1
#
# Runtime image for cloud training and serving jobs: SageMaker, Vertex AI and Azure ML custom containers.
# It holds the ML core, the model server and the object-store filesystems (airflow-llmops[local,mlflow,serving,
# storage]: s3fs, gcsfs, adlfs) installed from the same lock as scripts/bootstrap.sh. tini is PID 1 (it reaps
# torchrun's processes and forwards SIGTERM); docker/runtime-entrypoint.sh hands `train` and `serve` (the default)
# to airflow_llmops.ml.runtime, which speaks SageMaker's container contract under /opt/ml.
# Build from the repository root:
#
#   docker build -f docker/runtime.Dockerfile -t airflow-llmops-runtime:dev .
#   # GPU variant: the CUDA line of the lock's nvidia-* pins (PyPI torch 2.13.0 is built on CUDA 13.0)
#   docker build -f docker/runtime.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 \
#       -t airflow-llmops-runtime:dev-cu130 .
#   # Azure ML sweep jobs: trials log their metric to the workspace's MLflow (azureml:// needs its plugin)
#   docker build -f docker/runtime.Dockerfile --build-arg EXTRA_PACKAGES=azureml-mlflow -t airflow-llmops-runtime:azure .
FROM python:3.11-slim

# Must equal TORCH_VERSION in scripts/bootstrap.sh (checked by tests/unit/test_docker.py).
ARG TORCH_VERSION=2.13.0
# Default: the CPU build. Installed with pip before everything else, so the resolver keeps it.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Packages beyond the lock's (space-separated requirement specifiers), e.g. azureml-mlflow for Azure ML sweeps.
ARG EXTRA_PACKAGES=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/airflow-llmops
COPY pyproject.toml README.md ./
COPY requirements/ requirements/

RUN python -m venv "$VIRTUAL_ENV" \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && pip install --no-cache-dir "uv>=0.5"

COPY airflow_llmops/ airflow_llmops/

RUN --mount=type=cache,target=/root/.cache/uv \
    UV_LINK_MODE=copy uv pip install -c requirements/lock.txt ".[local,mlflow,serving,storage]" ${EXTRA_PACKAGES} \
 && python -c "import airflow_llmops, torch, s3fs, gcsfs, adlfs; print('airflow-llmops', airflow_llmops.__version__, 'torch', torch.__version__)"

COPY --chmod=0755 docker/runtime-entrypoint.sh /usr/local/bin/runtime-entrypoint.sh

# Runs as root: SageMaker mounts /opt/ml (model, input, output, checkpoints) owned by root and
# expects the container to write there. SageMaker serving and Vertex AI default to port 8080.
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/runtime-entrypoint.sh"]
CMD ["serve"]
