"""Authentication and encryption between tiers: TLS (mutual when a CA is given), a shared token
in call metadata, and the one function that makes every client channel.

Flags, on every tier (`add_security_args`):

    --tls-cert PEM --tls-key PEM   serve gRPC over TLS with this certificate; as a client (the
                                   router's links), present it to servers that ask for one
    --tls-ca PEM                   servers require and verify client certificates signed by this
                                   CA (mutual TLS); clients verify servers against it
    --tier-token TOKEN             servers refuse calls without `authorization: Bearer TOKEN`
                                   (UNAUTHENTICATED); clients send it. Default: $HILM_TIER_TOKEN

Health checks (grpc.health.v1) stay open to token-less callers, as vLLM's /health does; under
mutual TLS the handshake itself still needs a client certificate.

Session ownership: under mutual TLS the owner of a session is the client certificate's identity
(its common name, else its first subject alternative name) joined with the self-asserted client
id, so a peer can only ever reach its own sessions; without a client certificate it is the client
id as before (`owner_of`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from hilm_vllm.server.grpc_limits import grpc_options

TIER_TOKEN_ENV = "HILM_TIER_TOKEN"
AUTH_METADATA_KEY = "authorization"  # "Bearer <token>", as HTTP and vLLM's --api-key
# Methods a caller without a token may call (load balancers, `TierProcess.wait_healthy`).
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


@dataclass(frozen=True)
class Security:
    """One process's TLS material (PEM bytes) and tokens. Empty = plaintext, no token."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    token: str | None = None  # the tier token: sent by this process's clients, accepted by it
    server_name: str | None = None  # TLS name to expect from servers, when not their address
    # Extra bearer tokens this process's gRPC server accepts (the router's --api-key: its gRPC
    # Generate takes the same keys as its HTTP API).
    extra_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")

    @property
    def client_tls(self) -> bool:
        return self.cert is not None or self.ca is not None

    @property
    def mutual(self) -> bool:
        return self.cert is not None and self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS when a certificate is given; clients must present one signed by the CA when a
        CA is given."""
        if self.cert is None:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.client_tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def accepted_tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.token, *self.extra_tokens) if t)

    def describe(self) -> str:
        tls = "mutual TLS" if self.mutual else "TLS" if self.cert is not None else "plaintext"
        return f"{tls}, {'token required' if self.accepted_tokens() else 'no token'}"


INSECURE = Security()
_process_security: Security = INSECURE


def set_process_security(security: Security) -> None:
    """The identity of this process (`hilm-serve` sets it from its flags): the default of
    `make_channel` and so of every client the process makes."""
    global _process_security
    _process_security = security


def process_security() -> Security:
    return _process_security


# ---- flags -------------------------------------------------------------------------------------

def add_security_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "security between tiers",
        "TLS for gRPC (mutual when --tls-ca is given) and a shared token. The same flags serve "
        "a tier's server and its clients (the router's links to the tiers).")
    g.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                   help="certificate chain to serve gRPC over TLS with, and to present to other "
                        "tiers as a client (needs --tls-key)")
    g.add_argument("--tls-key", type=Path, default=None, metavar="PEM",
                   help="private key of --tls-cert")
    g.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                   help="CA that signs the tiers' certificates: with it, servers require client "
                        "certificates (mutual TLS) and clients verify servers against it "
                        "(default: plaintext, or the system's roots when only --tls-cert is set)")
    g.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="name the other tiers' certificates are checked against, when it is "
                        "not the host of their address (default: the host)")
    g.add_argument("--tier-token", default=None, metavar="TOKEN",
                   help=f"shared secret between tiers: servers refuse calls without "
                        f"`authorization: Bearer TOKEN` (UNAUTHENTICATED), clients send it; "
                        f"health checks stay open. Prefer the environment to the command line "
                        f"(visible in ps). Default: ${TIER_TOKEN_ENV}")


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror}") from None


def security_from_args(args: argparse.Namespace, extra_tokens: Iterable[str] = ()) -> Security:
    """The flags above as a Security; raises ValueError naming the flag that is wrong."""
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    ca = getattr(args, "tls_ca", None)
    token = getattr(args, "tier_token", None) or os.environ.get(TIER_TOKEN_ENV) or None
    if ca is not None and cert is None:
        # A client could verify servers with the CA alone, but a server would serve plaintext:
        # refuse the half-configured tier rather than let it look secure.
        raise ValueError("--tls-ca needs --tls-cert and --tls-key (this tier's own certificate)")
    return Security(_read(cert, "--tls-cert"), _read(key, "--tls-key"), _read(ca, "--tls-ca"),
                    token, getattr(args, "tls_server_name", None),
                    tuple(t for t in extra_tokens if t))


def security_args(security: Security, files: dict[str, Path]) -> list[str]:
    """Command-line flags for a child `hilm-serve` (tests, benchmarks): `files` maps cert, key,
    ca to the PEM files holding `security`'s material. The token goes through the environment
    (`security_env`), never argv."""
    args = []
    for name in ("cert", "key", "ca"):
        if getattr(security, name) is not None:
            args += [f"--tls-{name}", str(files[name])]
    if security.server_name:
        args += ["--tls-server-name", security.server_name]
    return args


def security_env(security: Security) -> dict[str, str]:
    return {TIER_TOKEN_ENV: security.token} if security.token else {}


# ---- clients -----------------------------------------------------------------------------------

def _token_metadata(token: str) -> tuple[str, str]:
    return (AUTH_METADATA_KEY, f"Bearer {token}")


class _ClientCallDetails(grpc.aio.ClientCallDetails):
    pass


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = (credentials, wait_for_ready,
                                                                   compression)


class _AioToken:
    """Adds the bearer token to a call's metadata. grpc.aio files an interceptor under the first
    call kind it implements, so each kind gets its own instance (`_aio_token_interceptors`)."""

    def __init__(self, token: str):
        self._token = token

    def _details(self, d):
        metadata = grpc.aio.Metadata(*(d.metadata or ()), _token_metadata(self._token))
        return _ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


class _AioTokenUU(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioTokenUS(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioTokenSU(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioTokenSS(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def _aio_token_interceptors(token: str) -> list:
    return [k(token) for k in (_AioTokenUU, _AioTokenUS, _AioTokenSU, _AioTokenSS)]


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    def _details(self, d):
        metadata = [*(d.metadata or ()), _token_metadata(self._token)]
        return _SyncDetails(d.method, d.timeout, metadata, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def make_channel(address: str, security: Security | None = None,
                 options: Sequence[tuple[str, object]] = (), aio: bool = True):
    """The channel of every client of a tier: TLS and the tier token as `security` (default: this
    process's, `set_process_security`) says. `aio=False` makes a blocking channel (health checks
    of `launch.TierProcess`)."""

    security = process_security() if security is None else security
    options = [*grpc_options(), *options]  # the one message limit
    if security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    creds = security.channel_credentials()
    if aio:
        interceptors = _aio_token_interceptors(security.token) if security.token else None
        if creds is None:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        return grpc.aio.secure_channel(address, creds, options=options, interceptors=interceptors)
    channel = (grpc.insecure_channel(address, options=options) if creds is None
               else grpc.secure_channel(address, creds, options=options))
    if security.token:
        channel = grpc.intercept_channel(channel, _SyncToken(security.token))
    return channel


# ---- servers -----------------------------------------------------------------------------------

def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_ok(header: str | None, digests: Sequence[bytes]) -> bool:
    """`Bearer <token>` matching one of `digests` (sha256, compared in constant time)."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value:
        return False
    given = _digest(value)
    ok = False
    for d in digests:
        ok |= secrets.compare_digest(given, d)
    return ok


def _deny_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as the method it stands for

    # No request deserializer: the refused request stays bytes (an unauthenticated peer does
    # not get its message parsed); nothing is ever serialised back.
    kw = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(stream, **kw)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks without one of the accepted bearer tokens."""

    def __init__(self, tokens: Sequence[str], flag: str = "--tier-token"):
        self._digests = [_digest(t) for t in tokens]
        self._message = (f"missing or wrong `{AUTH_METADATA_KEY}: Bearer <token>` metadata: this "
                         f"tier requires the token it was started with ({flag} / "
                         f"${TIER_TOKEN_ENV})")

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        header = next((v for k, v in details.invocation_metadata or ()
                       if k == AUTH_METADATA_KEY), None)
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if bearer_ok(header, self._digests):
            return handler
        return _deny_handler(handler, self._message)


def server_interceptors(security: Security) -> list[grpc.aio.ServerInterceptor]:
    tokens = security.accepted_tokens()
    return [TokenInterceptor(tokens)] if tokens else []


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The verified client certificate's identity (CN, else the first SAN), or None without one.
    gRPC fills these only for a certificate that the server's CA verified."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - a context without transport security
        return None
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = auth.get(key)
        if values:
            v = values[0]
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return None
