"""DICOM TLS for the listener (PS3.15 Annex B.9, the BCP 195 profile)."""

from __future__ import annotations

import ssl

from dicomai.config import TlsSettings
from dicomai.errors import ConfigError

# BCP 195 (RFC 9325) recommended suites: forward secrecy and AEAD only.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The listener's TLS context, or None when no certificate is configured.

    Raises
    ------
    ConfigError
        A certificate, key or CA file cannot be read or does not match.
    """
    if tls.cert is None:
        return None
    if tls.key is None:
        raise ConfigError("ingest.tls.key is required with ingest.tls.cert")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.ca is not None:
            context.load_verify_locations(cafile=tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ingest.tls: cannot load certificate material: {exc}") from None
    if tls.require_client_cert and tls.ca is None:
        raise ConfigError("ingest.tls.require_client_cert needs ingest.tls.ca")
    if tls.ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def probe_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The TLS context `dicomai health` calls its own listener with, or None without TLS.

    It checks that this machine's listener answers, not who it is, so the server's
    certificate is not verified (`ca` is the CA of the *clients*' certificates). Where client
    certificates are required the probe presents the listener's own: one signed by that CA
    and usable for client authentication (a certificate limited to serverAuth makes the probe
    fail; health says so).
    """
    if tls.cert is None or tls.key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls.require_client_cert:
        context.load_cert_chain(tls.cert, tls.key)
    return context
