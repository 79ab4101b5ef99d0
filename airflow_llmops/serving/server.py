"""``airflow-llmops serve``: start the model server with variants from the command line or a state file.

    airflow-llmops serve --port 8080 --model champion=models:/clf@champion:90 --model challenger=/m/clf2:10 \\
        --shadow candidate=file:///m/clf3 --admin-token "$TOKEN" --request-log /var/log/llmops \\
        --state-file /var/lib/llmops/state.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from airflow_llmops.serving.config import ENV_ADMIN_TOKEN, ENV_API_KEY, ServerConfig, VariantSpec, parse_model_arg


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
    parser.add_argument("--admin-token", help=f"bearer token of /admin/* (default: ${ENV_ADMIN_TOKEN}; none: disabled)")
    parser.add_argument("--api-key", help=f"bearer token required on /v1/* (default: ${ENV_API_KEY}; none: open)")
    parser.add_argument("--served-model-name", default=defaults.served_model_name)
    parser.add_argument("--request-log", type=Path, help="folder of the JSONL request log (off when not given)")
    parser.add_argument("--request-log-max-bytes", type=int, default=defaults.request_log_max_bytes)
    parser.add_argument("--request-log-max-age-s", type=float, default=defaults.request_log_max_age_s)
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
    parser.add_argument("--shadow-max-pending", type=int, default=defaults.shadow_max_pending)
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action="store_true", help="uvicorn's per-request access log")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        variants=[*args.variants, *args.shadows],
        admin_token=args.admin_token,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        request_log=args.request_log,
        request_log_max_bytes=args.request_log_max_bytes,
        request_log_max_age_s=args.request_log_max_age_s,
        state_file=args.state_file,
        model_cache=args.model_cache,
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        max_inputs=args.max_inputs,
        max_tokens_limit=args.max_tokens_limit,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        shadow_max_pending=args.shadow_max_pending,
        torch_threads=args.torch_threads,
    ).with_env_defaults()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:  # pydantic's ValidationError names each bad option and value
        parser.error(str(err))
    no_state = config.state_file is None or not config.state_file.is_file()
    if not config.variants and no_state and config.admin_token is None:
        parser.error(
            "no variants: give --model NAME=SOURCE, a --state-file that exists, or --admin-token to add "
            "variants later through the admin API"
        )
    import uvicorn

    from airflow_llmops.serving.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=10,
    )
    return 0
