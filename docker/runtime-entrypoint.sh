#!/usr/bin/env bash
# Entry point of the runtime image (docker/runtime.Dockerfile) for SageMaker, Vertex AI and Azure ML jobs.
#
#   train [ARGS...]  -> python -m airflow_llmops.ml.train ARGS...
#                       (SageMaker starts training containers as `<image> train`)
#   serve [ARGS...]  -> airflow-llmops serve --host HOST --port PORT ARGS...
#                       (SageMaker starts serving containers as `<image> serve` and sends traffic to 8080;
#                        Vertex AI passes the port in AIP_HTTP_PORT)
#   anything else    -> run as given (bash, python ..., torchrun ...)
#
# Environment: AIP_HTTP_PORT (Vertex AI) > LLMOPS_SERVE_PORT > 8080; LLMOPS_SERVE_HOST (default 0.0.0.0).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: runtime-entrypoint.sh train [ARGS...]   train a model (python -m airflow_llmops.ml.train)
       runtime-entrypoint.sh serve [ARGS...]   serve models over HTTP (airflow-llmops serve)
       runtime-entrypoint.sh COMMAND [ARGS...] run any other command
USAGE
}

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 64
fi

command="$1"
shift
case "$command" in
  train)
    exec python -m airflow_llmops.ml.train "$@"
    ;;
  serve)
    port="${AIP_HTTP_PORT:-${LLMOPS_SERVE_PORT:-8080}}"
    exec airflow-llmops serve --host "${LLMOPS_SERVE_HOST:-0.0.0.0}" --port "$port" "$@"
    ;;
  -h | --help | help)
    usage
    ;;
  *)
    exec "$command" "$@"
    ;;
esac
