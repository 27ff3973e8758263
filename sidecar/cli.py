"""The command line (SPEC §1): run | check | demo | token new | keygen | explain."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from sidecar.config.loader import config_path, load
from sidecar.config.yaml_lines import ConfigError

if TYPE_CHECKING:
    from sidecar.config.model import LoadedConfig


def main(argv: list[str] | None = None) -> int:
    from sidecar import __version__

    parser = argparse.ArgumentParser(prog="sidecar", description="A reverse-proxy authentication sidecar.")
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve the proxy and the admin API")
    run.add_argument("--config")
    run.add_argument("--host", default="0.0.0.0")
    run.add_argument("--port", type=int, default=8080)
    run.add_argument("--admin-port", type=int, default=9901)
    run.add_argument("--decision-port", type=int, default=None,
                     help="serve decision mode (nginx auth_request, Traefik/Caddy forward auth, Envoy ext_authz) on "
                          "this port, on 127.0.0.1 unless SIDECAR_DECISION_HOST says otherwise")
    run.add_argument("--decision-grpc-port", type=int, default=None,
                     help="serve Envoy's gRPC ext_authz (envoy.service.auth.v3.Authorization/Check) on this port, "
                          "same host as --decision-port (needs the grpc extra: pip install 'sidecar[grpc]')")
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--grace", type=float, default=30.0,
                     help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    run.add_argument("--tls-cert", help="serve HTTPS: certificate chain (PEM); overrides listen.tls_cert")
    run.add_argument("--tls-key", help="the certificate's private key (PEM); overrides listen.tls_key")
    run.add_argument("--tls-client-ca", help="ask clients for a certificate signed by this CA (PEM)")
    run.add_argument("--admin-tls-cert", help="serve the admin port over HTTPS with this certificate (PEM)")
    run.add_argument("--admin-tls-key", help="the admin certificate's private key (PEM)")
    run.add_argument("--metrics-port", type=int, help="also serve only /metrics on this port (same host as --host)")
    run.add_argument("--log-format", choices=["json", "text"],
                     help="operational logs on stderr: json (default, or $SIDECAR_LOG_FORMAT) or text")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"],
                     help="default info, or $SIDECAR_LOG_LEVEL")
    run.add_argument("--report-only", action="store_true",
                     help="every route reports only: refusals are audited as would_deny and forwarded anyway")

    check = commands.add_parser("check", help="validate the configuration")
    check.add_argument("--config")
    check.add_argument("--decision", action="store_true",
                       help="the policy also serves decision mode: warn about routes that need a request body")

    demo = commands.add_parser("demo", help="run the bundled demo and print curl lines")
    demo.add_argument("--self-test", action="store_true", help="send the printed requests, check them, exit")

    token = commands.add_parser("token", help="client access tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    token_new = token_commands.add_parser("new", help="mint a client access token")
    token_new.add_argument("--client", required=True)

    keygen = commands.add_parser("keygen", help="print a new signing key (PEM)")
    keygen.add_argument("--alg", default="RS256", choices=["RS256", "ES256", "EdDSA"])

    commands.add_parser("schema", help="print the configuration's JSON Schema")

    explain = commands.add_parser("explain", help="show how a request would be handled, without sending it")
    explain.add_argument("--config")
    explain.add_argument("method")
    explain.add_argument("url")
    explain.add_argument("-H", "--header", action="append", default=[])

    test = commands.add_parser("test", help="run a policy's declared test cases, offline")
    test.add_argument("--config", help="the policy to test (default: each tests file's `policy:`)")
    test.add_argument("--junit", metavar="FILE", help="also write the results as JUnit XML")
    test.add_argument("--coverage", action="store_true", help="list routes and authenticators no case reached")
    test.add_argument("tests", nargs="+", metavar="TESTS.yaml")

    args = parser.parse_args(argv)
    handler = {"run": cmd_run, "check": cmd_check, "demo": cmd_demo, "token": cmd_token, "keygen": cmd_keygen,
               "explain": cmd_explain, "schema": cmd_schema, "test": cmd_test}[args.command]
    return handler(args)


def _load_or_report(path: str):  # type: ignore[no-untyped-def]
    try:
        return load(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    from sidecar.ops.logging_setup import configure
    from sidecar.proxy.transports.registry import transport_kind
    from sidecar.server.runner import ListenError, run
    from sidecar.server.tls import ListenerTls, check_files

    # Workers are spawned processes: they read the choice from the environment.
    if args.log_format:
        os.environ["SIDECAR_LOG_FORMAT"] = args.log_format
    if args.log_level:
        os.environ["SIDECAR_LOG_LEVEL"] = args.log_level
    try:
        configure()
    except ValueError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    if args.report_only:
        from sidecar.config.loader import REPORT_ONLY_VARIABLE

        os.environ[REPORT_ONLY_VARIABLE] = "1"  # read by every load: workers and reloads included
    path = config_path(args.config)
    loaded = _load_or_report(path)
    if loaded is None:
        return 1
    for warning in report_only_warnings(loaded):
        print(warning, file=sys.stderr)
    try:
        transport_kind()
        tls = ListenerTls.choose(loaded.config.listen, args.tls_cert, args.tls_key, args.tls_client_ca)
        if bool(args.admin_tls_cert) != bool(args.admin_tls_key):
            raise ValueError("TLS on the admin port needs both --admin-tls-cert and --admin-tls-key")
        admin_tls = ListenerTls(args.admin_tls_cert, args.admin_tls_key) if args.admin_tls_cert else None
    except ValueError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    for listener in (tls, admin_tls):
        problem = check_files(listener) if listener else None
        if problem:
            print(f"sidecar: {problem}", file=sys.stderr)
            return 1
    admin_host = os.environ.get("SIDECAR_ADMIN_HOST", "127.0.0.1")
    decision_host = os.environ.get("SIDECAR_DECISION_HOST", "127.0.0.1")
    decision = None if args.decision_port is None else (decision_host, args.decision_port)
    decision_grpc = None if args.decision_grpc_port is None else (decision_host, args.decision_grpc_port)
    if decision_grpc is not None:
        try:
            import sidecar.proxy.decision_grpc  # noqa: F401
        except ImportError as exc:
            print(f"sidecar: --decision-grpc-port needs the grpc extra (pip install 'sidecar[grpc]'): {exc}",
                  file=sys.stderr)
            return 1
    try:
        return run(path, args.host, args.port, admin_host, args.admin_port, args.workers, args.grace, tls, admin_tls,
                   args.metrics_port, decision, decision_grpc)
    except ListenError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1


def cmd_check(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    loaded = _load_or_report(path)
    if loaded is None:
        return 1
    from sidecar.proxy.decision import body_warnings

    for warning in [*loaded.warnings, *(body_warnings(loaded) if args.decision else [])]:
        print(f"warning: {warning}", file=sys.stderr)
    for warning in report_only_warnings(loaded):
        print(warning, file=sys.stderr)
    print(f"{path}: ok ({len(loaded.config.routes)} routes, {len(loaded.authenticators)} authenticators)")
    return 0


def report_only_warnings(loaded: LoadedConfig) -> list[str]:
    return [f"WARNING: route {route.id} is REPORT-ONLY: requests it would refuse are FORWARDED to the upstream "
            "(audited as decision would_deny); set mode: enforce once the audit shows no surprise"
            for route in loaded.config.routes if route.mode == "report_only"]


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    return run_demo(["--self-test"] if args.self_test else [])


def cmd_token(args: argparse.Namespace) -> int:
    from sidecar.state.client_token_store import new_token, token_hash

    token = new_token()
    print(f"token (shown once; give it to client {args.client}): {token}")
    print("put this line in the client's tokens list:")
    print(f'  tokens: ["sha256:{token_hash(token)}"]')
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if args.alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    elif args.alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    sys.stdout.write(pem.decode())
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from sidecar.config.schema import schema_text

    sys.stdout.write(schema_text())
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from sidecar.proxy.explain import explain

    loaded = _load_or_report(config_path(args.config))
    if loaded is None:
        return 1
    print(explain(loaded, args.method, args.url, args.header))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from sidecar.policy_tests import main as run_tests

    return run_tests(args.tests, config=args.config, junit=args.junit, coverage=args.coverage)


if __name__ == "__main__":
    raise SystemExit(main())
