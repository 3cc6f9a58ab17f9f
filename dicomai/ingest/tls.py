"""DICOM TLS for the listener (PS3.15 Annex B.9, the BCP 195 profile)."""

from __future__ import annotations

import socket
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
        # Fail closed: a TLS setting without the certificate would run a plain listener.
        given = [name for name in ("key", "ca") if getattr(tls, name) is not None]
        given += ["require_client_cert"] if tls.require_client_cert else []
        if given:
            raise ConfigError(f"ingest.tls.cert is required with ingest.tls.{given[0]}")
        return None
    if tls.key is None:
        raise ConfigError("ingest.tls.key is required with ingest.tls.cert")
    for name in ("cert", "key", "ca"):
        path = getattr(tls, name)
        try:
            with open(path, "rb"):
                pass
        except TypeError:  # not given
            continue
        except OSError as exc:
            raise ConfigError(f"ingest.tls.{name}: cannot read {path}: {exc.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(
            f"ingest.tls.key: {tls.key} is encrypted; give an unencrypted PEM key (readable "
            "by the service user only)"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"ingest.tls.cert and .key: {tls.cert} and {tls.key} do not make a certificate "
            f"and its key: {exc}"
        ) from None
    if tls.ca is not None:
        try:
            context.load_verify_locations(cafile=tls.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"ingest.tls.ca: {tls.ca} holds no CA certificate: {exc}") from None
    if tls.require_client_cert and tls.ca is None:
        raise ConfigError("ingest.tls.require_client_cert needs ingest.tls.ca")
    if tls.ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


class _Encrypted(Exception):
    pass


def _no_passphrase() -> str:
    # OpenSSL would otherwise ask for the pass phrase on the terminal, and a service has none.
    raise _Encrypted


# What `handshake` returns for a connection closed, or silent until the timeout, before it
# sent anything.
CLOSED_UNSPOKEN = ""


# OpenSSL's reasons an administrator meets most, in words that say what to check.
_PLAIN_WORDS = {
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (a sender without TLS on the TLS port?)",
    "HTTP_REQUEST": "the peer sent HTTP, not TLS",
    "UNSUPPORTED_PROTOCOL": "the peer offers only a TLS version below 1.2 (BCP 195)",
    "NO_SHARED_CIPHER": "no cipher in common with the peer (BCP 195 ciphers only)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no client certificate",
}


def handshake(connection: socket.socket, timeout: float) -> str | None:
    """Complete a server-side TLS handshake within `timeout` seconds; None, or why it failed.

    Run on the connection's own thread: pynetdicom shakes hands on the thread that accepts
    connections, where one peer that connected and said nothing stopped every other sender.
    """
    if not isinstance(connection, ssl.SSLSocket):
        return None
    connection.settimeout(timeout)
    try:
        # A port check (a load balancer's, monitoring's) connects and closes without a byte:
        # not a refused client, and not worth a warning and an audit row every few seconds.
        # Nor is a connection that says nothing until the timeout: anyone able to reach the
        # port grew the audit trail by a row per such connection.
        if not socket.socket.recv(connection, 1, socket.MSG_PEEK):
            return CLOSED_UNSPOKEN
    except (TimeoutError, OSError):
        return CLOSED_UNSPOKEN
    try:
        connection.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        return f"TLS handshake failed: client certificate {exc.verify_message}"
    except ssl.SSLError as exc:
        reason = exc.reason or type(exc).__name__
        return f"TLS handshake failed: {_PLAIN_WORDS.get(reason, reason.lower())}"
    except TimeoutError:
        return f"TLS handshake not completed within {timeout:g} s"
    except OSError as exc:
        return f"TLS handshake failed: connection closed ({exc.strerror or type(exc).__name__})"
    connection.settimeout(None)
    return None


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
