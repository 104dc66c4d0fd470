"""The `meshpy` command: proxy, validate, schema, demo."""

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import json_schema, load_config, parse_duration
from .errors import ConfigError, MeshpyError
from .filters import build_filter_set

_LOG_LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")


def _port(text: str) -> int:
    if text.isdigit() and int(text) <= 65535:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a port between 0 and 65535, got {text!r}")


def _configure_logging(level: str) -> None:
    """Python's and the core's logs both go to stderr at `level`."""
    from . import _core  # imported here so that validate and schema never need the compiled core

    logging.basicConfig(
        level=_LOG_LEVELS[level],
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _core.init_logging(level)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _cmd_proxy(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    from .proxy import Sidecar

    try:
        sidecar = Sidecar(args.config, workers=args.workers)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except MeshpyError as exc:
        print(f"meshpy: {exc}", file=sys.stderr)
        return 1
    return sidecar.run(args.drain_timeout)


def _cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            config = load_config(path)
            # Creating the filters runs their __init__, which checks more than types can.
            build_filter_set(config, Path(path).parent)
        except ConfigError as exc:
            print(ConfigError(exc.errors, exc.source or path), file=sys.stderr)
            status = 1
            continue
        listeners = _plural(len(config.listeners), "listener")
        clusters = _plural(len(config.clusters), "cluster")
        print(f"{path}: ok ({listeners}, {clusters})")
    return status


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    from .demo import run_demo

    return run_demo(port=args.port, admin_port=args.admin_port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshpy", description="A service mesh with a Rust data plane, driven from Python."
    )
    parser.add_argument("--version", action="version", version=f"meshpy {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    def add_log_level(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--log-level", choices=list(_LOG_LEVELS), default="info", help="default: info"
        )

    proxy = commands.add_parser(
        "proxy",
        help="run one sidecar proxy",
        description="Run a sidecar proxy. The config is reloaded on SIGHUP and whenever the file"
        " changes; a bad config is refused and the running one kept. SIGTERM or SIGINT stops"
        " accepting and drains in-flight requests.",
    )
    proxy.add_argument("-c", "--config", required=True, metavar="FILE", help="sidecar YAML file")
    proxy.add_argument(
        "--workers", type=_positive_int, metavar="N", help="worker threads (default: all cores)"
    )
    proxy.add_argument(
        "--drain-timeout",
        type=_duration,
        default="15s",
        metavar="DURATION",
        help="how long shutdown waits for in-flight requests (default: 15s)",
    )
    add_log_level(proxy)
    proxy.set_defaults(handler=_cmd_proxy)

    validate = commands.add_parser(
        "validate",
        help="check config files",
        description="Check sidecar config files; every problem is printed as <field path>:"
        " <message>. Exits 1 if any file is invalid.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(handler=_cmd_validate)

    schema = commands.add_parser(
        "schema",
        help="print the config's JSON Schema",
        description="Print the JSON Schema of the sidecar config file, for editors.",
    )
    schema.set_defaults(handler=_cmd_schema)

    demo = commands.add_parser(
        "demo",
        help="run a proxy in front of demo services on localhost",
        description="Start three small echo services and a proxy routing to them, on localhost.",
    )
    demo.add_argument("--port", type=_port, default=8080, help="proxy port (default: 8080)")
    demo.add_argument("--admin-port", type=_port, default=9901, help="admin port (default: 9901)")
    add_log_level(demo)
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `meshpy` command and return its exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C before the proxy's own signal handling is installed
        return 130
