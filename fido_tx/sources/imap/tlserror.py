"""What a failed TLS connection to an IMAP server says: one error of kind ``tls``.

:func:`tls_error` turns the reason a TLS connection was lost (a certificate
that does not match the host, a chain that is not trusted, a failed
handshake: an ``ssl.SSLError`` from :mod:`fido_tx.sources.imap.stdtls`)
into a :class:`~fido_tx.errors.FidoError` a sysadmin can act on.
"""

import ssl

from fido_tx import errors
from fido_tx.errors import FidoError

#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)


def tls_error(reason, host=None):
    """A :class:`FidoError` of kind ``tls`` for a TLS failure, else ``None``
    (``host``: the host name the certificate was checked against)."""
    if reason is None:
        return None
    exc = reason.value
    if not isinstance(exc, ssl.SSLError):
        return None
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message
        if exc.verify_code in _NAME_MISMATCH:
            return FidoError(
                errors.TLS,
                "certificate does not match host" + (f" {host!r}" if host else ""),
                debug=f"certificate verification: {why}",
            )
        return FidoError(
            errors.TLS, "certificate verify failed" + (f": {why}" if why else ""))
    return FidoError(errors.TLS, f"TLS handshake failed: {_ssl_text(exc)}")


def _ssl_text(exc):
    """OpenSSL's own words ("wrong version number"), without the library
    tag and the source line ssl adds around them."""
    text = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    text = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
    text = text.rsplit(" (_ssl.c:", 1)[0]
    return text or getattr(exc, "reason", None) or type(exc).__name__
