"""What a failed TLS connection to an IMAP server says: one error of kind ``tls``.

:func:`tls_error` turns the reason a TLS connection was lost (a certificate
that does not match the host, a chain that is not trusted, a failed
handshake) into a :class:`~fido_tx.errors.FidoError` a sysadmin can act on.
"""

import sys

from fido_tx import errors
from fido_tx.errors import FidoError


def tls_error(reason, explain=None, host=None):
    """A :class:`FidoError` of kind ``tls`` for a TLS failure, else ``None``.

    :param explain: optional callable returning why the certificate chain
        was not trusted (``"self-signed certificate"``) or ``None``.
    """
    if reason is None or "OpenSSL.SSL" not in sys.modules:
        # no TLS connection was ever made (pyOpenSSL loads with the first):
        # this cannot be a TLS failure, and importing it would cost ~12 MiB
        return None
    try:
        from OpenSSL import SSL
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        return None
    if reason.check(VerificationError):
        return FidoError(
            errors.TLS,
            "certificate does not match host" + (f" {host!r}" if host else ""),
            debug=f"certificate verification: {reason.getErrorMessage()}",
        )
    if reason.check(SSL.Error):
        text = _ssl_text(reason.value)
        if "certificate verify failed" in text:
            why = None
            if explain is not None:
                try:
                    why = explain()
                except Exception:
                    why = None
            return FidoError(
                errors.TLS, "certificate verify failed" + (f": {why}" if why else "")
            )
        return FidoError(errors.TLS, f"TLS handshake failed: {text}")
    return None


def _ssl_text(exc):
    try:
        parts = [e[2] for e in exc.args[0] if e and e[2]]
    except (IndexError, TypeError):
        parts = []
    return "; ".join(parts) or str(exc) or type(exc).__name__
