"""TLS server credentials from PEM files: a server certificate, optionally requiring client certificates."""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port``, or None for plaintext (no certificate given).

    With ``client_ca``, clients must present a certificate signed by it (mutual TLS); without one the
    handshake fails, before any RPC.
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is on top of TLS)")
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )
