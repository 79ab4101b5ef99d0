"""``airflow-llmops`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="airflow-llmops")
    parser.add_argument(
        "command",
        choices=["demo", "serve"],
        help="demo: run the local reference pipeline in Airflow; serve: the model server (serve --help)",
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from airflow_llmops.devstack.demo import main as demo_main

        return demo_main(rest)
    if command == "serve":
        from airflow_llmops.serving.server import main as serve_main

        return serve_main(rest)
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
