#!/usr/bin/env bash
# Entry point of the runtime image (docker/runtime.Dockerfile) for SageMaker, Vertex AI and Azure ML jobs.
# tini runs it as PID 1's child, so SIGTERM (a stopped job, a reclaimed spot instance) reaches the runtime.
#
#   train [ARGS...]  -> python -m airflow_llmops.ml.runtime train ARGS...
#                       (SageMaker starts training containers as `<image> train`: spec from the hyperparameter
#                        llmops_spec, data from /opt/ml/input/data/dataset, torchrun over the job's hosts.
#                        Vertex AI, detected by CLUSTER_SPEC or AIP_MODEL_DIR, starts each CustomJob replica as
#                        `<image> train [--name=value ...]` (a tuning trial's values): spec from LLMOPS_SPEC, data
#                        from LLMOPS_DATASET_URI, model to AIP_MODEL_DIR, checkpoints in AIP_CHECKPOINT_DIR,
#                        torchrun over CLUSTER_SPEC's workerpool0 and workerpool1 replicas)
#   serve [ARGS...]  -> python -m airflow_llmops.ml.runtime serve ARGS...  (also the default: no arguments)
#                       (SageMaker starts serving containers as `<image> serve`: the model in /opt/ml/model,
#                        /ping and /invocations on port 8080. Vertex AI too, with the model in AIP_STORAGE_URI
#                        and its AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE on AIP_HTTP_PORT)
#   anything else    -> run as given (bash, python ..., torchrun ...)
#
# Environment: see airflow_llmops/ml/runtime.py. LLMOPS_OPT_ML replaces /opt/ml; serve listens on
# AIP_HTTP_PORT (Vertex AI) > SAGEMAKER_BIND_TO_PORT > LLMOPS_SERVE_PORT > 8080, host LLMOPS_SERVE_HOST (0.0.0.0).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: runtime-entrypoint.sh train [ARGS...]     run this host's share of a training job (SageMaker or Vertex AI
                                                 contract; on Vertex AI, ARGS are a tuning trial's --name=value)
       runtime-entrypoint.sh [serve [ARGS...]]   serve the model in /opt/ml/model or $AIP_STORAGE_URI (/ping,
                                                 /invocations, $AIP_PREDICT_ROUTE, /v1/...)
       runtime-entrypoint.sh COMMAND [ARGS...]   run any other command
USAGE
}

if [[ $# -eq 0 ]]; then
  set -- serve
fi

command="$1"
shift
case "$command" in
  train | serve)
    exec python -m airflow_llmops.ml.runtime "$command" "$@"
    ;;
  -h | --help | help)
    usage
    ;;
  *)
    exec "$command" "$@"
    ;;
esac
