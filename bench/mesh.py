"""``python -m bench mesh``: the mesh path, plaintext and mTLS between two sidecars.

Four systems forward to the same nginx upstream, measured in interleaved rounds like
``python -m bench``: ``direct`` (no proxy), ``one-hop`` (one meshpy), ``two-hop-plain``
(sidecar A -> sidecar B, plaintext between them) and ``two-hop-mtls`` (the same with
``tls: mesh`` on A's cluster and ``mtls: strict`` on B's listener). Every meshpy process
runs ``--workers 1``. Each round also counts new mTLS handshakes per second against one
sidecar (B of the mTLS pair) with ``bench/tlsload``, presenting A's certificate.
Certificates are issued per run with ``meshpy.ca`` from the meshpy under test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import harness, load, peers, report
from bench.harness import (
    describe_meshpy,
    measure_fixed_rate,
    measure_saturation,
    start_service,
)
from bench.peers import Creds
from bench.report import SystemRuns, _ms, _num, _rate

DIRECT, ONE_HOP, TWO_PLAIN, TWO_MTLS = "direct", "one-hop", "two-hop-plain", "two-hop-mtls"
SYSTEMS = (DIRECT, ONE_HOP, TWO_PLAIN, TWO_MTLS)
TRUST_DOMAIN = "example.org"
NAMESPACE = "bench"
TARGET = 0.80  # two-hop-mtls keeps at least this share of two-hop-plain's req/s


def spiffe_id(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench mesh",
        description="Throughput (wrk, saturation) and latency at a fixed rate (h2load) of "
        "no proxy, one meshpy, two meshpy sidecars in plaintext and two sidecars with mTLS "
        "between them, all forwarding to one nginx upstream; and new mTLS handshakes per "
        "second against one sidecar (bench/tlsload, full handshakes).",
    )
    parser.add_argument(
        "--systems", help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="--workers of every meshpy process (default 1)"
    )
    harness.add_load_arguments(parser, duration=8.0)
    parser.add_argument(
        "--rate",
        type=float,
        default=1000.0,
        help="fixed total req/s for the latency runs with h2load (default 1000; 0 skips them)",
    )
    harness.add_rate_connections_argument(parser)
    harness.add_latency_steal_limit_argument(parser)
    harness.add_latency_load_argument(parser)
    parser.add_argument(
        "--handshake-seconds",
        type=int,
        default=5,
        help="seconds of bench/tlsload per round (default 5; 0 skips the handshakes)",
    )
    add_handshake_connections_argument(parser)
    harness.add_pin_arguments(parser, "every meshpy process", "wrk/h2load/tlsload")
    harness.add_output_arguments(
        parser, "mesh-<timestamp>.json", "only say what to install if a tool is missing"
    )
    args = parser.parse_args(argv)
    harness.require_positive_counts(
        parser,
        args,
        (
            "threads",
            "rounds",
            "connections",
            "load_threads",
            "rate_connections",
            "handshake_connections",
        ),
    )
    if args.duration <= 0 or args.warmup < 0 or args.rate < 0 or args.handshake_seconds < 0:
        parser.error(
            "--duration must be positive; --warmup, --rate, --handshake-seconds not negative"
        )
    args.names = harness.select_systems(parser, args.systems, SYSTEMS)
    return args


# --------------------------------------------------------------------------- certificates


def issue_certificates(directory: Path) -> dict[str, Creds]:
    """A root CA for the run and one workload certificate for sidecars ``a`` and ``b``.

    Imported here, so it is the ``meshpy.ca`` of the meshpy under test.
    """
    from meshpy.ca import CertificateAuthority, write_pem_files

    ca = CertificateAuthority.create_root(TRUST_DOMAIN)
    creds = {}
    for service in ("a", "b"):
        paths = write_pem_files(directory / service, ca.issue(service, NAMESPACE, "2h"))
        creds[service] = Creds(paths["cert.pem"], paths["key.pem"], paths["bundle.pem"])
    return creds


# --------------------------------------------------------------------------- sidecars


def sidecar(
    name: str,
    workdir: Path,
    target_port: int,
    threads: int,
    cpus: str | None,
    identity: Creds | None = None,
    inbound_mtls: bool = False,
    outbound_mtls: bool = False,
    server_tls: Creds | None = None,
) -> peers.Service:
    """One ``meshpy proxy`` with one http listener routing ``/`` to one endpoint.

    ``inbound_mtls``: the listener is ``mtls: strict``; ``outbound_mtls``: the cluster is
    ``tls: mesh`` and expects sidecar b's identity. Both need ``identity``. ``server_tls``:
    the listener serves HTTPS (``tls: {cert, key}``) with that certificate and key, asking
    for no client certificate; not together with ``inbound_mtls``.
    """
    workdir.mkdir(parents=True)
    port, admin = peers.free_port(), peers.free_port()
    lines = [f"admin: {{listen: {peers.HOST}:{admin}}}"]
    if identity is not None:
        lines += [
            "identity:",
            f"  cert: {identity.cert}",
            f"  key: {identity.key}",
            f"  bundle: {identity.bundle}",
        ]
    lines += [
        "listeners:",
        "  - name: bench",
        f"    listen: {peers.HOST}:{port}",
        "    protocol: http",
        *(["    mtls: strict"] if inbound_mtls else []),
        *(
            ["    tls:", f"      cert: {server_tls.cert}", f"      key: {server_tls.key}"]
            if server_tls is not None
            else []
        ),
        "    routes:",
        "      - match: {path_prefix: /}",
        "        cluster: next",
        "clusters:",
        "  - name: next",
        f"    endpoints: [{peers.HOST}:{target_port}]",
        "    lb: round_robin",
        *(["    tls: mesh", f"    server_identity: {spiffe_id('b')}"] if outbound_mtls else []),
    ]
    config = workdir / "sidecar.yaml"
    config.write_text("\n".join(lines) + "\n")
    argv = [
        *peers.pin_prefix(cpus),
        *peers.meshpy_command(),
        "proxy",
        "-c",
        str(config),
        "--workers",
        str(threads),
    ]
    return peers.Service(name, port, argv, workdir, ready_text="meshpy proxy ready:")


@dataclass
class Sidecars:
    """The meshpy processes of one system, charged together for CPU time."""

    name: str
    members: list[peers.Service]

    def cpu_seconds(self) -> float:
        return sum(member.cpu_seconds() for member in self.members)


@dataclass
class MeshSystem(peers.System):
    members: tuple[peers.Service, ...] = ()

    def exited(self) -> str | None:
        for member in self.members:
            code = member.proc.poll() if member.proc else None
            if code is not None:
                return f"{member.name} had exited with code {code}"
        return None


def build_systems(
    args: argparse.Namespace, root: Path, upstream: peers.Service, creds: dict[str, Creds]
) -> dict[str, tuple[MeshSystem, list[peers.Service]]]:
    """Each system with its services, in start order (B before A); nothing started yet."""
    t, cpus, up = args.threads, args.pin_proxy, upstream.port
    out: dict[str, tuple[MeshSystem, list[peers.Service]]] = {}
    for name in args.names:
        if name == DIRECT:
            out[name] = (MeshSystem(name, up, upstream), [])
        elif name == ONE_HOP:
            one = sidecar(ONE_HOP, root / ONE_HOP, up, t, cpus)
            out[name] = (MeshSystem(name, one.port, one, one, (one,)), [one])
        else:
            mtls = name == TWO_MTLS
            b = sidecar(
                f"{name}-b",
                root / f"{name}-b",
                up,
                t,
                cpus,
                identity=creds["b"] if mtls else None,
                inbound_mtls=mtls,
            )
            a = sidecar(
                f"{name}-a",
                root / f"{name}-a",
                b.port,
                t,
                cpus,
                identity=creds["a"] if mtls else None,
                outbound_mtls=mtls,
            )
            group = Sidecars(f"{name}(a+b)", [a, b])
            system = MeshSystem(name, a.port, group, a, (a, b))  # type: ignore[arg-type]
            out[name] = (system, [b, a])
    return out


# --------------------------------------------------------------------------- handshakes


HANDSHAKE_CONNECTIONS = 16


def add_handshake_connections_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--handshake-connections",
        type=int,
        default=HANDSHAKE_CONNECTIONS,
        help="connections bench/tlsload keeps in handshakes at once (default "
        f"{HANDSHAKE_CONNECTIONS})",
    )


def tlsload_command(
    port: int,
    seconds: int,
    connections: int,
    pin: list[str],
    client: Creds | None,
    resume: bool = False,
) -> list[str]:
    """``bench/tlsload`` against ``port``, presenting ``client``'s certificate if given; full
    handshakes unless ``resume``."""
    presented = ["--cert", str(client.cert), "--key", str(client.key)] if client else []
    return [
        *pin,
        str(peers.tlsload_binary()),
        "--connect",
        f"{peers.HOST}:{port}",
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
        # The client checks neither the server's chain nor its signature: each is an ECDSA
        # verification on the client's core, more than the server spends signing, while the
        # server's work is the same. Checking, one client core cannot keep one server busy.
        "--verify",
        "none",
        *presented,
        *(["--resume"] if resume else []),
    ]


class HandshakesFailed(RuntimeError):
    """tlsload did not finish, failed or counted errors (already printed)."""


def measure_handshakes(
    args: argparse.Namespace, b: peers.Service, command: list[str], label: str, round_index: int
) -> dict[str, Any] | None:
    """``count_handshakes``, measured again while too much CPU time was stolen (see
    ``harness.retake_while_stolen``); the runs set aside are listed in the kept one's
    ``retaken``. None if the client failed or counted errors."""
    try:
        kept, set_aside = harness.retake_while_stolen(
            args,
            lambda: count_handshakes(args, b, command, label),
            lambda run: float(run["cpu"]["steal_pct"]),
            label,
            args.steal_limit,
        )
    except HandshakesFailed:
        return None
    kept["retaken"] = [
        {
            "round": round_index + 1,
            "steal_pct": run["cpu"]["steal_pct"],
            "handshakes_per_s": run["handshakes_per_s"],
        }
        for run in set_aside
    ]
    return kept


def count_handshakes(
    args: argparse.Namespace, b: peers.Service, command: list[str], label: str
) -> dict[str, Any]:
    """``command`` (``tlsload_command``) for ``--handshake-seconds``: new TLS 1.3 connections,
    each a handshake both ends completed, then a close. Returns handshakes/s and the
    server's (B's) CPU per one; raises ``HandshakesFailed`` if the client failed or counted
    errors."""
    start, cpu_start = load.CpuSample.now(), b.cpu_seconds()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.handshake_seconds + 60
        )
    except subprocess.TimeoutExpired:
        print(f"{label} handshakes failed: tlsload did not finish", file=sys.stderr)
        raise HandshakesFailed from None
    cpu_used = b.cpu_seconds() - cpu_start
    cpu = load.CpuSample.now().usage_since(start)
    try:
        counts = json.loads(done.stdout)
    except json.JSONDecodeError:
        counts = None
    if done.returncode != 0 or not counts or counts["errors"] or not counts["handshakes"]:
        print(
            f"{label} handshakes failed: exit {done.returncode}\n{done.stdout}{done.stderr}",
            file=sys.stderr,
        )
        raise HandshakesFailed
    total, seconds = counts["handshakes"], counts["seconds"]
    result = {
        "tool": "bench/tlsload",
        "command": command,
        "connections": args.handshake_connections,
        "handshakes": total,
        "wall_s": seconds,
        "handshakes_per_s": round(total / seconds, 1),
        "b_cpu_us_per_handshake": round(cpu_used * 1e6 / total, 1),
        "cpu": cpu,
    }
    print(
        f"{label} handshakes {result['handshakes_per_s']:>10,.0f} /s  ({total} in "
        f"{seconds:.1f} s, {args.handshake_connections} connections)  server cpu "
        f"{result['b_cpu_us_per_handshake']} µs/handshake  cpu busy {cpu['busy_pct']}% "
        f"steal {cpu['steal_pct']}%",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------- run


def run_benchmark(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    load_pin = peers.pin_prefix(args.pin_load)
    script = load.write_wrk_script(root)
    size = len(peers.SMALL_BODY)
    saturation = {name: SystemRuns(name) for name in args.names}
    fixed_rate = {name: SystemRuns(name) for name in args.names}
    handshakes: list[dict[str, Any]] = []
    handshake_failures: list[str] = []
    logs: dict[str, str] = {}
    creds = issue_certificates(root / "pki")

    with contextlib.ExitStack() as stack:
        upstream = peers.upstream_nginx(root / "upstream", args.pin_upstream)
        start_service(stack, upstream, "/", size)
        print(f"upstream nginx on port {upstream.port}", flush=True)
        built = build_systems(args, root, upstream, creds)
        systems: list[MeshSystem] = []
        services: list[peers.Service] = []
        for name, (system, to_start) in built.items():
            try:
                for service in to_start:
                    services.append(service)
                    stack.callback(service.stop)
                    service.start()
                # One GET end to end (B of the mTLS pair takes no plaintext; through A, it
                # also shows that the mTLS hop works).
                peers.check_response(system.port, "/", size)
            except peers.PeerError as exc:
                message = str(exc).splitlines()[0]
                print(f"{name}: did not start: {exc}", file=sys.stderr)
                saturation[name].failures.append(message)
                fixed_rate[name].failures.append(message)
                continue
            ports = " -> ".join(str(s.port) for s in reversed(to_start)) or "-"
            print(f"{name}: client -> {ports} -> upstream {upstream.port}", flush=True)
            systems.append(system)
        mtls_b = next((s.members[1] for s in systems if s.name == TWO_MTLS), None)

        width = max(len(name) for name in SYSTEMS)
        for round_index in range(args.rounds):
            for system in harness.rotated(systems, round_index):
                label = f"round {round_index + 1}/{args.rounds} {system.name:<{width}}"
                reason = system.exited()
                if reason:
                    for runs in (saturation[system.name], fixed_rate[system.name]):
                        runs.failures.append(f"round {round_index + 1}: {reason}")
                    print(f"{label} skipped: {reason}", flush=True)
                    continue
                url = system.url("/")
                measure_saturation(
                    args,
                    system,
                    url,
                    round_index,
                    script,
                    load_pin,
                    saturation[system.name],
                    (),
                    label,
                )
                if args.rate:
                    measure_fixed_rate(
                        args,
                        system,
                        url,
                        round_index,
                        args.rate,
                        load_pin,
                        root,
                        fixed_rate[system.name],
                        (),
                        label,
                    )
            if args.handshake_seconds and mtls_b is not None:
                label = f"round {round_index + 1}/{args.rounds} {'b (mTLS)':<{width}}"
                if mtls_b.proc is None or mtls_b.proc.poll() is not None:
                    handshake_failures.append(f"round {round_index + 1}: b had exited")
                    continue
                command = tlsload_command(
                    mtls_b.port,
                    args.handshake_seconds,
                    args.handshake_connections,
                    load_pin,
                    creds["a"],
                )
                result = measure_handshakes(args, mtls_b, command, label, round_index)
                if result is None:
                    handshake_failures.append(f"round {round_index + 1}: tlsload failed")
                else:
                    handshakes.append(result)
        for service in services:
            logs[service.name] = service.log_tail()

    return {
        "saturation": [saturation[name] for name in args.names],
        "fixed_rate": [fixed_rate[name] for name in args.names] if args.rate else [],
        "handshakes": handshakes,
        "handshake_failures": handshake_failures,
        "logs": logs,
    }


# --------------------------------------------------------------------------- summaries

# (numerator, denominator, what it says)
RATIOS = (
    (TWO_MTLS, TWO_PLAIN, "mTLS between the sidecars vs plaintext"),
    (TWO_PLAIN, ONE_HOP, "a second sidecar"),
    (ONE_HOP, DIRECT, "one sidecar vs no proxy"),
)


def summarize_saturation(runs: list[SystemRuns]) -> list[dict[str, Any]]:
    direct = next((r for r in runs if r.name == DIRECT), None)
    baseline = direct.median("rps") if direct else None
    summaries = []
    for r in runs:
        s = r.summary(baseline, None)
        s.pop("cpu_vs_nginx", None)
        summaries.append(s)
    return summaries


def summarize_fixed_rate(runs: list[SystemRuns]) -> list[dict[str, Any]]:
    return report.latency_over(runs, TWO_PLAIN, "latency_us_over_two_hop_plain")


def ratios(saturation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {s["system"]: s for s in saturation}
    out = []
    for top, bottom, meaning in RATIOS:
        a = by_name.get(top, {}).get("rps_median")
        b = by_name.get(bottom, {}).get("rps_median")
        value = round(a / b, 3) if a and b else None
        entry: dict[str, Any] = {"ratio": f"{top} / {bottom}", "meaning": meaning, "value": value}
        if top == TWO_MTLS:
            entry["target"] = TARGET
            entry["met"] = None if value is None else value >= TARGET
        out.append(entry)
    return out


def summarize_handshakes(results: list[dict[str, Any]], failures: list[str]) -> dict[str, Any]:
    if not results:
        return {"rounds_ok": 0, "failures": failures}
    rates = [r["handshakes_per_s"] for r in results]
    cpus = [r["b_cpu_us_per_handshake"] for r in results if r["b_cpu_us_per_handshake"]]
    return {
        "rounds_ok": len(results),
        "handshakes_per_s_median": round(statistics.median(rates), 1),
        "handshakes_per_s_min": min(rates),
        "handshakes_per_s_max": max(rates),
        "b_cpu_us_per_handshake_median": round(statistics.median(cpus), 1) if cpus else None,
        "retaken": [run for result in results for run in result.get("retaken", [])],
        "failures": failures,
    }


def retaken_handshake_lines(summary: dict[str, Any]) -> list[str]:
    """A footnote naming the handshake counts that were measured again because of steal."""
    retaken = summary.get("retaken")
    return [f"  measured again for steal: {report.retaken_rounds(retaken)}"] if retaken else []


# --------------------------------------------------------------------------- tables


def saturation_table(summaries: list[dict[str, Any]]) -> str:
    header = (
        f"{'system':<13} {'req/s median':>12} {'spread (min-max)':>19} {'vs direct':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu µs/req':>10}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        if not s["rounds_ok"]:
            lines.append(f"{s['system']:<13} failed: {'; '.join(s['failures'])[:80]}")
            continue
        spread = f"{_rate(s['rps_min'])}-{_rate(s['rps_max'])}"
        lat = s["latency_us_median"]
        cpu = _num(s["cpu_us_per_req_median"], ".1f")
        if s["system"] == DIRECT and cpu != "-":
            cpu += "*"
        lines.append(
            f"{s['system']:<13} {_rate(s['rps_median']):>12} {spread:>19} "
            f"{_num(s['ratio_to_direct'], '.2f'):>9} {_ms(lat['p50']):>8} {_ms(lat['p99']):>8} "
            f"{s['errors']:>7} {cpu:>10}"
        )
    lines.append(
        "cpu µs/req: meshpy processes only (both sidecars summed for two-hop); "
        "* direct: the upstream nginx's"
    )
    return "\n".join(lines + report.retaken_lines(summaries))


def fixed_rate_table(summaries: list[dict[str, Any]]) -> str:
    return report.latency_over_table(summaries, 13, "latency_us_over_two_hop_plain")


def handshake_lines(summary: dict[str, Any], args: argparse.Namespace) -> list[str]:
    if not summary["rounds_ok"]:
        return [f"handshakes: failed: {'; '.join(summary['failures'])[:120]}"]
    return [
        f"New mTLS handshakes against sidecar b (mtls: strict, --workers {args.threads}); "
        f"bench/tlsload with a's certificate, {args.handshake_connections} connections, full "
        f"handshakes, {args.handshake_seconds} s per round, medians over "
        f"{summary['rounds_ok']} round(s):",
        f"  handshakes/s {summary['handshakes_per_s_median']:,.0f} "
        f"(spread {summary['handshakes_per_s_min']:,.0f}-{summary['handshakes_per_s_max']:,.0f}); "
        f"b cpu {_num(summary['b_cpu_us_per_handshake_median'], '.1f')} µs per handshake",
        *retaken_handshake_lines(summary),
    ]


def ratio_lines(checks: list[dict[str, Any]]) -> list[str]:
    lines = []
    for c in checks:
        value = "not measured" if c["value"] is None else f"{c['value']:.3f}"
        line = f"{c['ratio']}: {value} ({c['meaning']})"
        if "target" in c:
            verdict = "not measured" if c["met"] is None else ("met" if c["met"] else "NOT met")
            line += f"; target >= {c['target']:.2f}: {verdict}"
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- main


def header(
    args: argparse.Namespace,
    command_line: str,
    machine: dict[str, Any],
    meshpy: dict[str, object] | None,
    revision: str | None,
) -> list[str]:
    lines = [
        *harness.header_start(command_line, machine),
        f"meshpy: {describe_meshpy(meshpy)}; checkout {revision or 'unknown'}; "
        f"Python {machine['python']}",
        f"meshpy extension: {meshpy['path'] if meshpy else '-'}",
        f"load: wrk -t{args.load_threads} -c{args.connections} -d{args.duration:g}s "
        f"(+{args.warmup:g}s warm-up); h2load at {args.rate:g} req/s over "
        f"{args.rate_connections} connections; bench/tlsload x {args.handshake_connections} "
        f"connections for {args.handshake_seconds} s; meshpy workers {args.threads} per "
        f"process; rounds {args.rounds}; CPU pinning upstream={args.pin_upstream or 'none'} "
        f"proxy={args.pin_proxy or 'none'} load={args.pin_load or 'none'}",
        harness.steal_line(args),
    ]
    return lines + harness.header_warnings(machine, meshpy)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command_line = shlex.join(["python", "-m", "bench", "mesh", *argv])
    harness.handle_signals()

    try:
        peers.ensure_tools(install=not args.no_install)
        harness.build_latency_load(args)
        if args.handshake_seconds:
            peers.tlsload_binary()
    except (peers.PeerError, subprocess.CalledProcessError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 2
    meshpy = peers.meshpy_info()
    if meshpy is None:
        print(harness.MESHPY_MISSING, file=sys.stderr)
        return 2

    machine = report.machine_info()
    revision = report.git_revision(harness.REPO)
    started = time.strftime("%Y%m%d-%H%M%S")
    print("\n".join(header(args, command_line, machine, meshpy, revision)))
    print(flush=True)

    results, code = harness.run_in_workspace(args.keep_tmp, lambda root: run_benchmark(args, root))
    if code is not None:
        return code
    loadavg_end = list(os.getloadavg())

    meshpy_changed = harness.meshpy_changed(meshpy)
    saturation = summarize_saturation(results["saturation"])
    fixed_rate = summarize_fixed_rate(results["fixed_rate"])
    handshakes = summarize_handshakes(results["handshakes"], results["handshake_failures"])
    checks = ratios(saturation)
    print()
    print(
        f"Throughput at saturation (wrk keep-alive, medians over {args.rounds} round(s); "
        "vs direct: req/s over direct's):"
    )
    print(saturation_table(saturation))
    if fixed_rate:
        load_name, gap_note = harness.fixed_rate_load(args)
        print()
        print(
            f"Latency at a fixed {args.rate:g} req/s ({load_name}, {args.rate_connections} "
            f"connections, medians over {args.rounds} round(s); +p50/+p99: over "
            f"{TWO_PLAIN}'s; {gap_note}):"
        )
        print(fixed_rate_table(fixed_rate))
    if args.handshake_seconds and TWO_MTLS in args.names:
        print()
        print("\n".join(handshake_lines(handshakes, args)))
    print()
    print("\n".join(ratio_lines(checks)))
    print(f"loadavg at the end: {' '.join(f'{x:.2f}' for x in loadavg_end)}")

    document = {
        "scenario": "mesh",
        "command": command_line,
        "started": started,
        "machine": machine,
        "loadavg_at_end": loadavg_end,
        "tools": peers.tool_versions(),
        "meshpy": meshpy,
        "meshpy_changed_during_run": meshpy_changed,
        "revision": revision,
        "settings": harness.settings_json(args),
        "saturation": {
            "summary": saturation,
            "runs": harness.runs_json(results["saturation"]),
        },
        "fixed_rate": {
            "rate": args.rate,
            "summary": fixed_rate,
            "runs": harness.runs_json(results["fixed_rate"]),
        },
        "handshakes": {"summary": handshakes, "runs": results["handshakes"]},
        "ratios": checks,
        "proxy_logs": results["logs"],
    }
    harness.write_results(args.out_dir, "mesh", started, document)
    every = saturation + fixed_rate
    failed = any(s["failures"] or s.get("errors") for s in every) or bool(handshakes["failures"])
    return 1 if failed else 0
