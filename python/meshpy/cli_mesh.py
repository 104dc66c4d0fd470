"""The `meshpy` commands that talk to the mesh: control-plane, apply, get, delete, status, token."""

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, MeshpyError

_KINDS = ("services", "routes", "policies", "filters")


def _client(args: argparse.Namespace) -> Any:
    from .controlplane.client import AdminClient

    return AdminClient.from_env(args.server, args.token_file, args.ca_bundle)


def _run(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Errors from the control plane or the local files become one line and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from .controlplane.client import ClientError

        try:
            return action(args)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        except ClientError as exc:
            lines = exc.errors or [exc.detail]
            for line in lines:
                print(f"meshpy: {exc.status}: {line}", file=sys.stderr)
            return 1
        except MeshpyError as exc:
            print(f"meshpy: {exc}", file=sys.stderr)
            return 1

    return run


def _cmd_control_plane(args: argparse.Namespace) -> int:
    from .cli import _configure_logging
    from .controlplane.server import ControlPlaneSettings, run_control_plane

    _configure_logging(args.log_level)
    settings = ControlPlaneSettings(
        listen=args.listen,
        data_dir=Path(args.data_dir),
        store=args.store,
        ca_dir=Path(args.ca) if args.ca else None,
        trust_domain=args.trust_domain,
        advertise=args.advertise,
        admin_token_file=Path(args.admin_token_file) if args.admin_token_file else None,
        cert_ttl=args.cert_ttl,
        server_cert_ttl=args.server_cert_ttl,
        lease_ttl=args.lease_ttl,
        name=args.name,
    )
    return run_control_plane(settings)


def _cmd_apply(args: argparse.Namespace) -> int:
    from .controlplane.models import dump_resource, load_resources

    resources = []
    for path in args.files:
        resources += [dump_resource(r) for r in load_resources(path)]
    client = _client(args)
    for result in client.apply(resources):
        kind = result["kind"].lower()
        print(f"{kind}/{result['namespace']}/{result['name']} {result['action']}"
              f" (version {result['version']})")  # fmt: skip
    return 0


def _age(moment: str | None) -> str:
    if not moment:
        return "-"
    left = dt.datetime.fromisoformat(moment) - dt.datetime.now(dt.UTC)
    seconds = int(left.total_seconds())
    if seconds <= 0:
        return "expired"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _summary(resource: dict[str, Any]) -> str:
    spec = resource.get("spec", {})
    kind = resource["kind"]
    if kind == "Service":
        timeout = spec.get("timeout")
        return f"lb={spec.get('lb')}" + (f" timeout={timeout}s" if timeout else "")
    if kind == "Route":
        match = {k: v for k, v in spec.get("match", {}).items() if v}
        return f"{spec['host']} {json.dumps(match) if match else '*'} -> {spec['service']}"
    if kind == "AuthorizationPolicy":
        return f"{spec['service']}: {len(spec.get('rules', []))} rules, default {spec['default']}"
    paths = [next(iter(ref)) for ref in spec.get("filters", [])]
    return f"{spec['service']}: {', '.join(paths)}"


def _cmd_get(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.kind == "endpoints":
        items = client.request("GET", "/v1/endpoints")
        if args.output == "table":
            rows = [[e["namespace"], e["service"], e["address"], e.get("sidecar") or e["source"]]
                    for e in items]  # fmt: skip
            print(_table(["NAMESPACE", "SERVICE", "ADDRESS", "REGISTERED BY"], rows))
            return 0
    else:
        items = client.list_resources(args.kind, args.namespace)
    if args.output == "json":
        print(json.dumps(items, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump_all(items, sort_keys=False), end="")
    else:
        rows = [[r["metadata"]["namespace"], r["metadata"]["name"],
                 str(r["metadata"]["version"]), _summary(r)] for r in items]  # fmt: skip
        print(_table(["NAMESPACE", "NAME", "VERSION", "SPEC"], rows))
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    _client(args).delete(args.kind, args.namespace, args.name)
    print(f"{args.kind}/{args.namespace}/{args.name} deleted")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    sidecars = _client(args).sidecars()
    if args.output == "json":
        print(json.dumps(sidecars, indent=2))
        return 0
    rows = [
        [
            s["id"],
            f"{s['namespace']}/{s['service']}",
            s["address"],
            str(s["version"] if s["version"] is not None else "-"),
            "yes" if s["in_sync"] else ("ERROR" if s["error"] else "no"),
            _age(s["cert_not_after"]),
        ]
        for s in sidecars
    ]
    print(_table(["SIDECAR", "SERVICE", "ADDRESS", "VERSION", "IN SYNC", "CERT EXPIRES IN"], rows))
    for s in sidecars:
        if s["error"]:
            print(f"{s['id']}: {s['error']}", file=sys.stderr)
    return 0


def _cmd_token_create(args: argparse.Namespace) -> int:
    answer = _client(args).create_token(args.service, args.namespace, args.ttl)
    if args.output:
        path = Path(args.output)
        path.write_text(answer["token"] + "\n")
        path.chmod(0o600)
        print(f"token for {answer['spiffe_id']} written to {path}, valid until"
              f" {answer['expires_at']}", file=sys.stderr)  # fmt: skip
    else:
        print(answer["token"])
    return 0


def _add_client_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--server", help="control plane URL (default: $MESHPY_SERVER)")
    command.add_argument(
        "--token-file", help="admin token file (default: $MESHPY_TOKEN_FILE, or $MESHPY_TOKEN)"
    )
    command.add_argument("--ca-bundle", help="PEM trust anchors (default: $MESHPY_CA)")


def add_mesh_commands(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
    duration: Callable[[str], float],
    log_levels: list[str],
) -> None:
    cp = commands.add_parser(
        "control-plane",
        help="run the control plane",
        description="Serve the mesh's API, CA and config watch over HTTPS. State lives in an"
        " embedded store in --data-dir, or in etcd with --store etcd://host:port,...",
    )
    cp.add_argument("--listen", default="127.0.0.1:15010", help="default: 127.0.0.1:15010")
    cp.add_argument("--data-dir", default="meshpy-data", help="default: ./meshpy-data")
    cp.add_argument("--store", help="etcd://host:2379[,host:2379...] (default: embedded)")
    cp.add_argument("--ca", help="a CA directory (meshpy ca init); default: DATA_DIR/ca")
    cp.add_argument("--trust-domain", default="mesh.local", help="for a new CA")
    cp.add_argument("--advertise", action="append", default=[], metavar="HOST",
                    help="a name or IP sidecars use to reach it (repeatable)")  # fmt: skip
    cp.add_argument("--admin-token-file", help="default: DATA_DIR/admin-token")
    cp.add_argument("--cert-ttl", type=duration, default="1h", help="workload certificates")
    cp.add_argument(
        "--server-cert-ttl",
        type=duration,
        default="720h",
        help="its own HTTPS certificate, renewed at 2/3 of it while running (default: 720h)",
    )
    cp.add_argument("--lease-ttl", type=duration, default="5s",
                    help="how long a silent sidecar stays registered (default: 5s)")  # fmt: skip
    cp.add_argument("--name", help="this replica's name in logs")
    cp.add_argument("--log-level", choices=log_levels, default="info")
    cp.set_defaults(handler=_cmd_control_plane)

    apply = commands.add_parser(
        "apply",
        help="create or update mesh resources from files",
        description="Send every resource of the files (Service, Route, AuthorizationPolicy,"
        " FilterAttachment) to the control plane; all are checked before any is written.",
    )
    apply.add_argument("-f", "--file", dest="files", action="append", required=True)
    _add_client_options(apply)
    apply.set_defaults(handler=_run(_cmd_apply))

    get = commands.add_parser("get", help="list mesh resources")
    get.add_argument("kind", choices=[*_KINDS, "endpoints"])
    get.add_argument("-n", "--namespace")
    get.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    _add_client_options(get)
    get.set_defaults(handler=_run(_cmd_get))

    delete = commands.add_parser("delete", help="delete a mesh resource")
    delete.add_argument("kind", choices=_KINDS)
    delete.add_argument("name")
    delete.add_argument("-n", "--namespace", default="default")
    _add_client_options(delete)
    delete.set_defaults(handler=_run(_cmd_delete))

    status = commands.add_parser(
        "status", help="every sidecar, the config version it runs, and whether it is in sync"
    )
    status.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _add_client_options(status)
    status.set_defaults(handler=_run(_cmd_status))

    token = commands.add_parser("token", help="join tokens for sidecars")
    token_commands = token.add_subparsers(metavar="ACTION", required=True)
    create = token_commands.add_parser(
        "create", help="a token one service's sidecars join with (it expires)"
    )
    create.add_argument("--service", required=True)
    create.add_argument("-n", "--namespace", default="default")
    create.add_argument("--ttl", default="1h", help="default: 1h")
    create.add_argument("-o", "--output", help="write the token to this file (mode 0600)")
    _add_client_options(create)
    create.set_defaults(handler=_run(_cmd_token_create))
