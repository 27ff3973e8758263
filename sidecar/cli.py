"""The command line (SPEC §1): run | check | demo | token new | keygen | explain."""

from __future__ import annotations

import argparse
import os
import sys

from sidecar.config.loader import config_path, load
from sidecar.config.yaml_lines import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidecar", description="A reverse-proxy authentication sidecar.")
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

    explain = commands.add_parser("explain", help="show how a request would be handled, without sending it")
    explain.add_argument("--config")
    explain.add_argument("method")
    explain.add_argument("url")
    explain.add_argument("-H", "--header", action="append", default=[])

    args = parser.parse_args(argv)
    handler = {"run": cmd_run, "check": cmd_check, "demo": cmd_demo, "token": cmd_token, "keygen": cmd_keygen,
               "explain": cmd_explain}[args.command]
    return handler(args)


def _load_or_report(path: str):  # type: ignore[no-untyped-def]
    try:
        return load(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    from sidecar.proxy.transports.registry import transport_kind
    from sidecar.server.runner import ListenError, run
    from sidecar.server.tls import ListenerTls, check_files

    path = config_path(args.config)
    loaded = _load_or_report(path)
    if loaded is None:
        return 1
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
                   decision, decision_grpc)
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
    print(f"{path}: ok ({len(loaded.config.routes)} routes, {len(loaded.authenticators)} authenticators)")
    return 0


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


def cmd_explain(args: argparse.Namespace) -> int:
    from sidecar.proxy.explain import explain

    loaded = _load_or_report(config_path(args.config))
    if loaded is None:
        return 1
    print(explain(loaded, args.method, args.url, args.header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
