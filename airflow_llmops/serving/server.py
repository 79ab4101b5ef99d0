"""``airflow-llmops serve``: start the model server with variants from the command line or a state file.

    LLMOPS_ADMIN_TOKEN="$TOKEN" airflow-llmops serve --port 8080 --supervise \\
        --model champion=models:/clf@champion:90 --model challenger=/m/clf2:10 --shadow candidate=file:///m/clf3 \\
        --api-key-file /etc/llmops/api-key --request-log /var/log/llmops --state-file /var/lib/llmops/state.json

Tokens come from the environment (``LLMOPS_ADMIN_TOKEN``, ``LLMOPS_API_KEY``) or from files
(``--admin-token-file``, ``--api-key-file``): ``--admin-token``/``--api-key`` still work, but a command line is
visible to every user of the machine (``ps``), so the server warns when they are used. ``--supervise`` runs the
server under :mod:`airflow_llmops.serving.supervisor`, which restarts it when it dies.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from airflow_llmops.serving.config import (
    ENV_ADMIN_TOKEN,
    ENV_API_KEY,
    ENV_FAULT_INJECTION,
    ENV_REQUEST_LOG_SHIP_URI,
    ServerConfig,
    VariantSpec,
    parse_model_arg,
    read_secret_file,
)

log = logging.getLogger(__name__)


def _variant(value: str) -> VariantSpec:
    try:
        return parse_model_arg(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _shadow(value: str) -> VariantSpec:
    try:
        return parse_model_arg(value, shadow=True)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="airflow-llmops serve", description="Serve model variants over HTTP (classify, OpenAI completions)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--model",
        dest="variants",
        action="append",
        type=_variant,
        default=[],
        metavar="NAME=SOURCE[:WEIGHT]",
        help="a variant; SOURCE is a folder, file://PATH, models:/NAME@ALIAS, models:/NAME/VERSION or echo://",
    )
    parser.add_argument(
        "--shadow",
        dest="shadows",
        action="append",
        type=_shadow,
        default=[],
        metavar="NAME=SOURCE[:PERCENT]",
        help="a shadow variant: gets PERCENT (default 100) of requests as copies; answers logged, never returned",
    )
    admin = parser.add_mutually_exclusive_group()
    admin.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="PATH",
        help=f"file holding the bearer token of /admin/*, read at start (or set ${ENV_ADMIN_TOKEN}; neither: the "
        "admin API is disabled)",
    )
    admin.add_argument(
        "--admin-token", help=f"the admin token itself: visible in `ps`, prefer ${ENV_ADMIN_TOKEN} or the file"
    )
    api = parser.add_mutually_exclusive_group()
    api.add_argument(
        "--api-key-file",
        type=Path,
        metavar="PATH",
        help=f"file holding the bearer token required on /v1/*, read at start (or set ${ENV_API_KEY}; neither: open)",
    )
    api.add_argument("--api-key", help=f"the API key itself: visible in `ps`, prefer ${ENV_API_KEY} or the file")
    parser.add_argument("--served-model-name", default=defaults.served_model_name)
    parser.add_argument("--request-log", type=Path, help="folder of the JSONL request log (off when not given)")
    parser.add_argument("--request-log-max-bytes", type=int, default=defaults.request_log_max_bytes)
    parser.add_argument("--request-log-max-age-s", type=float, default=defaults.request_log_max_age_s)
    parser.add_argument(
        "--request-log-retention-s",
        type=float,
        default=defaults.request_log_retention_s,
        help="delete request-log files last written longer ago than this (default: 7 days)",
    )
    parser.add_argument(
        "--request-log-max-total-bytes",
        type=int,
        default=defaults.request_log_max_total_bytes,
        help="delete the oldest request-log files beyond this total size (default: 1 GiB)",
    )
    parser.add_argument(
        "--request-log-ship-uri",
        metavar="URI",
        help="copy each rotated request-log file (and the last one at shutdown) to URI, any fsspec URI (gs://, "
        f"s3://, abfs://, file://, a path), named requests-<stamp>-<server id>.jsonl (${ENV_REQUEST_LOG_SHIP_URI} "
        "is the default; $LLMOPS_SERVER_ID names this server, default hostname-pid)",
    )
    parser.add_argument(
        "--state-file", type=Path, help="JSON of the variants, rewritten on every admin change; wins over --model"
    )
    parser.add_argument("--model-cache", type=Path, help="where models:/ and other remote sources are downloaded")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars)
    parser.add_argument("--max-inputs", type=int, default=defaults.max_inputs)
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens_limit)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-batch-delay-ms", type=float, default=defaults.max_batch_delay_ms)
    parser.add_argument(
        "--max-decode-batch-size",
        type=int,
        default=defaults.max_decode_batch_size,
        help="sequences a causal LM variant decodes together; requests beyond it wait to join the batch "
        f"(default {defaults.max_decode_batch_size})",
    )
    parser.add_argument(
        "--backend",
        choices=["hf", "vllm"],
        default=defaults.backend,
        help="how causal-LM variants generate: hf, the built-in continuous batching (default), or vllm, vLLM's "
        "engine (a CUDA machine with the vllm package; quantized artifacts and classifiers keep their loaders)",
    )
    parser.add_argument("--shadow-max-pending", type=int, default=defaults.shadow_max_pending)
    parser.add_argument(
        "--redact-output-pii",
        action="store_true",
        help="replace e-mail addresses, phone/card numbers, IBANs, IP addresses and secrets in generated text "
        "(streamed too) with placeholders, for every variant that does not set its own redact_output_pii",
    )
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action="store_true", help="uvicorn's per-request access log")
    parser.add_argument(
        "--enable-fault-injection",
        action="store_true",
        help=f"TESTS ONLY: allow a variant's `fault` (made-up errors and latency) through the admin API (or set "
        f"{ENV_FAULT_INJECTION}=1); without it such requests answer 404",
    )
    supervise = parser.add_argument_group("supervision")
    supervise.add_argument(
        "--supervise",
        action="store_true",
        help="a small parent process holds the listening socket and restarts the server when it dies; requests "
        "that arrive meanwhile wait and are answered by the new server",
    )
    supervise.add_argument("--max-restarts-per-minute", type=int, default=5, help="more: the supervisor gives up")
    supervise.add_argument(
        "--restart-wait-for-models-s",
        type=float,
        default=120.0,
        help="a restarted server takes no request until its models are loaded, at most this long",
    )
    return parser


def _secret(args: argparse.Namespace, name: str, what: str) -> str | None:
    path = getattr(args, f"{name}_file")
    if path is not None:
        return read_secret_file(path, what)
    value: str | None = getattr(args, name)
    if value is not None:
        flag = "--" + name.replace("_", "-")
        env = ENV_ADMIN_TOKEN if name == "admin_token" else ENV_API_KEY
        hint = f"use {env} or {flag}-file"
        log.warning("%s on the command line is visible to every user of this machine (ps): %s", flag, hint)
    return value


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        variants=[*args.variants, *args.shadows],
        admin_token=_secret(args, "admin_token", "admin token"),
        api_key=_secret(args, "api_key", "API key"),
        served_model_name=args.served_model_name,
        request_log=args.request_log,
        request_log_max_bytes=args.request_log_max_bytes,
        request_log_max_age_s=args.request_log_max_age_s,
        request_log_retention_s=args.request_log_retention_s,
        request_log_max_total_bytes=args.request_log_max_total_bytes,
        request_log_ship_uri=args.request_log_ship_uri,
        enable_fault_injection=args.enable_fault_injection,
        state_file=args.state_file,
        model_cache=args.model_cache,
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        max_inputs=args.max_inputs,
        max_tokens_limit=args.max_tokens_limit,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        max_decode_batch_size=args.max_decode_batch_size,
        backend=args.backend,
        redact_output_pii=args.redact_output_pii,
        shadow_max_pending=args.shadow_max_pending,
        torch_threads=args.torch_threads,
    ).with_env_defaults()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as err:  # pydantic's ValidationError names each bad option and value; unreadable token files
        parser.error(str(err))
    no_state = config.state_file is None or not config.state_file.is_file()
    if not config.variants and no_state and config.admin_token is None:
        parser.error(
            "no variants: give --model NAME=SOURCE, a --state-file that exists, or --admin-token to add "
            "variants later through the admin API"
        )
    if config.backend == "vllm":
        from airflow_llmops.serving.vllm_backend import vllm_unavailable

        reason = vllm_unavailable()
        if reason is not None:
            parser.error(f"--backend vllm: {reason}; use --backend hf (the built-in continuous batching)")
    if config.enable_fault_injection:
        log.warning("failure injection is enabled: a test feature; never run a production server like this")
    if args.supervise:
        from airflow_llmops.serving.supervisor import Supervisor

        return Supervisor(
            config,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.access_log,
            max_restarts_per_minute=args.max_restarts_per_minute,
            restart_wait_for_models_s=args.restart_wait_for_models_s,
        ).run()
    import uvicorn

    from airflow_llmops.serving.app import create_app

    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=10,
    )
    return 0
