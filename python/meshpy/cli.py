"""The `meshpy` command: proxy, validate, schema, demo, ca, and the mesh commands (cli_mesh)."""

import argparse
import datetime
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from .cli_mesh import add_mesh_commands
from .errors import ConfigError, MeshpyError

# Each command imports what it needs when it runs: pydantic's models, the compiled core,
# cryptography and the control plane's HTTP stack cost megabytes of RSS apiece, and a sidecar
# or `meshpy ca` should not carry the others.

_LOG_LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for: finding it imports importlib.metadata."""

    def __init__(self, option_strings: Sequence[str], dest: str, **_: object) -> None:
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version"
        )

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from . import __version__

        print(f"meshpy {__version__}")
        parser.exit()


def _duration(text: str) -> float:
    from .config import parse_duration

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
    from .config import is_mesh_bootstrap

    try:
        if is_mesh_bootstrap(_peek_yaml(args.config)):
            from .agent import MeshAgent  # with httpx and cryptography, which others never need

            return MeshAgent(args.config, workers=args.workers).run(args.drain_timeout)
        from .proxy import Sidecar

        sidecar = Sidecar(args.config, workers=args.workers)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except MeshpyError as exc:
        print(f"meshpy: {exc}", file=sys.stderr)
        return 1
    return sidecar.run(args.drain_timeout)


def _peek_yaml(path: str) -> object:
    """The first document of a YAML file, or None when it cannot be read (reported later)."""
    try:
        with open(path, "rb") as file:
            return next(yaml.safe_load_all(file), None)
    except (OSError, yaml.YAMLError):
        return None


def _validate_other(path: str) -> str | None:
    """Check a mesh resource file or a control-plane sidecar file; None for a plain config."""
    from .agent import is_mesh_bootstrap, load_bootstrap
    from .controlplane.models import is_resource_file, load_resources

    try:
        text = Path(path).read_bytes()
    except OSError:
        return None
    if is_resource_file(text):
        return _plural(len(load_resources(path)), "resource")
    if is_mesh_bootstrap(_peek_yaml(path)):
        boot = load_bootstrap(path)
        return f"sidecar of {boot.namespace}/{boot.service}, config from the control plane"
    return None


def _cmd_validate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .filters import build_filter_set

    status = 0
    for path in args.files:
        try:
            other = _validate_other(path)
            if other is not None:
                print(f"{path}: ok ({other})")
                continue
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
    from .config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(port=args.port, data_dir=args.data_dir, log_level=args.log_level)


# The key types of meshpy.ca.KEY_TYPES, spelled out so that building the parser does not
# import cryptography (a test checks the two agree).
_CA_KEY_TYPES = ("ecdsa-p256", "ed25519")


def _ca_argument(check_name: str) -> Callable[[str], str]:
    """An argparse type running one of meshpy.ca's validators (bad values exit 2)."""

    def check(text: str) -> str:
        from . import ca

        try:
            return getattr(ca, check_name)(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return check


def _ttl(text: str) -> str:
    from .ca import parse_ttl

    try:
        parse_ttl(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _ca_run(action: Callable[[], str]) -> int:
    """Run a `ca` command: its report on stdout, or exit 2 for a wrong argument, 1 for a failure."""
    from .ca import CADirectoryError, CAError

    try:
        report = action()
    except (CADirectoryError, ValueError) as exc:
        print(f"meshpy: {exc}", file=sys.stderr)
        return 2
    except (CAError, OSError) as exc:
        print(f"meshpy: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


def _until(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _cmd_ca_init(args: argparse.Namespace) -> int:
    from .ca import CertificateAuthority

    def init() -> str:
        root = CertificateAuthority.create_root(
            args.trust_domain, key_type=args.key_type, ttl=args.ttl
        )
        root.save(args.dir)
        return (
            f"root CA for {root.spiffe_id} created in {args.dir}"
            f" ({root.key_type}, valid until {_until(root.not_after)})\n"
            "  ca.pem      the root certificate\n"
            "  ca.key      its private key, mode 0600: keep it offline, let intermediates issue\n"
            "  bundle.pem  the trust bundle every workload gets"
        )

    return _ca_run(init)


def _cmd_ca_intermediate(args: argparse.Namespace) -> int:
    from .ca import CAError, CertificateAuthority

    def intermediate() -> str:
        root = CertificateAuthority.load(args.ca)
        if root.kind != "root":
            raise CAError(
                f"{args.ca} holds an intermediate CA, which cannot sign other CAs"
                " (path length 0); give the root CA's directory"
            )
        made = root.create_intermediate(ttl=args.ttl, key_type=args.key_type)
        made.save(args.dir)
        return (
            f"intermediate CA for {made.spiffe_id} created in {args.dir}, signed by {args.ca}"
            f" ({made.key_type}, valid until {_until(made.not_after)})\n"
            "  ca.pem      the intermediate certificate\n"
            "  ca.key      its private key, mode 0600\n"
            "  chain.pem   sent after every workload certificate it issues\n"
            "  bundle.pem  the trust bundle: the root"
        )

    return _ca_run(intermediate)


def _cmd_ca_issue(args: argparse.Namespace) -> int:
    from .ca import CertificateAuthority, parse_ttl, write_pem_files

    def issue() -> str:
        authority = CertificateAuthority.load(args.ca)
        issued = authority.issue(
            args.service,
            args.namespace,
            args.ttl,
            dns_names=args.dns or (),
            key_type=args.key_type,
        )
        write_pem_files(args.out, issued)
        capped = issued.lifetime.total_seconds() < parse_ttl(args.ttl) - 1
        intermediates = len(authority.chain)
        chain = f", then {intermediates} intermediate" if intermediates else ""
        return (
            f"{issued.spiffe_id} issued in {args.out} (valid until {_until(issued.not_after)}"
            f"{', cut short by the CA expiring' if capped else ''})\n"
            f"  cert.pem    the workload certificate{chain}\n"
            "  key.pem     its private key, mode 0600\n"
            "  bundle.pem  the trust bundle"
        )

    return _ca_run(issue)


def _cmd_ca_show(args: argparse.Namespace) -> int:
    from .ca import describe

    result: dict[str, bool] = {}

    def show() -> str:
        text, result["ok"] = describe(args.path, args.bundle)
        return text

    status = _ca_run(show)
    return status if status or result["ok"] else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshpy", description="A service mesh with a Rust data plane, driven from Python."
    )
    parser.add_argument("--version", action=_VersionAction)
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
        description="Check sidecar config files and mesh resource files (what meshpy apply"
        " sends); every problem is printed as <field path>: <message>. Exits 1 if any file is"
        " invalid.",
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
        help="run the demo shop as a mesh on localhost",
        description="Start a control plane, the shop's four services with a sidecar each and an"
        " ingress sidecar on --port, all on localhost, until Ctrl-C or SIGTERM.",
    )
    demo.add_argument(
        "--port", type=_port, default=8080, help="the ingress (entry) port (default: 8080)"
    )
    demo.add_argument(
        "--data-dir",
        metavar="DIR",
        help="keep state and logs here (default: a temporary directory, removed on exit)",
    )
    add_log_level(demo)
    demo.set_defaults(handler=_cmd_demo)
    _add_ca_commands(commands)
    add_mesh_commands(commands, _duration, list(_LOG_LEVELS))
    return parser


def _add_ca_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    ca = commands.add_parser(
        "ca",
        help="the mesh certificate authority: init, intermediate, issue, show",
        description="Create the mesh's certificate authority and issue SPIFFE workload"
        " certificates (X.509-SVIDs) for spiffe://<trust domain>/ns/<namespace>/sa/<service>."
        " Exit codes: 2 for a wrong argument, 1 when the operation fails.",
    )
    ca_commands = ca.add_subparsers(metavar="COMMAND", required=True)

    def add_key_type(command: argparse.ArgumentParser, what: str) -> None:
        command.add_argument(
            "--key-type",
            choices=_CA_KEY_TYPES,
            default="ecdsa-p256",
            help=f"{what} key type (default: ecdsa-p256)",
        )

    init = ca_commands.add_parser(
        "init",
        help="create a root CA",
        description="Create a root CA in DIR: ca.pem, ca.key (0600), bundle.pem, ca.json."
        " Refuses a directory that already holds a CA.",
    )
    init.add_argument(
        "--trust-domain",
        required=True,
        type=_ca_argument("validate_trust_domain"),
        metavar="NAME",
        help="the mesh's SPIFFE trust domain, such as example.org",
    )
    add_key_type(init, "the root's")
    init.add_argument(
        "--ttl", type=_ttl, default="3650d", metavar="TTL", help="validity (default: 3650d)"
    )
    init.add_argument("dir", metavar="DIR")
    init.set_defaults(handler=_cmd_ca_init)

    intermediate = ca_commands.add_parser(
        "intermediate",
        help="create an intermediate CA signed by the root",
        description="Create an intermediate CA in DIR, signed by the root CA in --ca, so the"
        " root's key can stay offline: ca.pem, ca.key (0600), chain.pem, bundle.pem (the"
        " root), ca.json. Its validity ends no later than the root's.",
    )
    intermediate.add_argument("--ca", required=True, metavar="ROOTDIR", help="root CA directory")
    add_key_type(intermediate, "the intermediate's")
    intermediate.add_argument(
        "--ttl", type=_ttl, default="365d", metavar="TTL", help="validity (default: 365d)"
    )
    intermediate.add_argument("dir", metavar="DIR")
    intermediate.set_defaults(handler=_cmd_ca_intermediate)

    issue = ca_commands.add_parser(
        "issue",
        help="issue a workload certificate",
        description="Issue a workload certificate for"
        " spiffe://<trust domain>/ns/<namespace>/sa/<service> into OUT: cert.pem (the"
        " certificate, then the intermediates), key.pem (0600), bundle.pem. Files already in"
        " OUT are replaced. Its validity ends no later than the CA's.",
    )
    issue.add_argument("--ca", required=True, metavar="DIR", help="the issuing CA's directory")
    issue.add_argument(
        "--service", required=True, type=_ca_argument("validate_service"), metavar="NAME"
    )
    issue.add_argument(
        "--namespace", required=True, type=_ca_argument("validate_namespace"), metavar="NAME"
    )
    issue.add_argument(
        "--ttl", type=_ttl, default="24h", metavar="TTL", help="validity (default: 24h)"
    )
    issue.add_argument(
        "--dns",
        action="append",
        type=_ca_argument("validate_dns_name"),
        metavar="NAME",
        help="also a DNS SAN, for clients outside the mesh (repeatable)",
    )
    add_key_type(issue, "the workload's")
    issue.add_argument("out", metavar="OUT")
    issue.set_defaults(handler=_cmd_ca_issue)

    show = ca_commands.add_parser(
        "show",
        help="describe a certificate and check its chain",
        description="Print a certificate's subject, SPIFFE ID, issuer and validity, and whether"
        " it chains to the trust bundle (--bundle, else the bundle.pem beside it). PATH is a"
        " PEM file (the first certificate is shown, the rest are its chain), a CA directory or"
        " a directory written by `issue`. Exits 1 if it does not chain to the bundle.",
    )
    show.add_argument("--bundle", metavar="FILE", help="trust bundle to check against")
    show.add_argument("path", metavar="PATH")
    show.set_defaults(handler=_cmd_ca_show)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `meshpy` command and return its exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C before the proxy's own signal handling is installed
        return 130
