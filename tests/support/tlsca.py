"""A throwaway certificate authority for TLS tests.

One CA and a handful of EC P-256 certificates are generated once per process
(EC keys take milliseconds, RSA keys would not) and written as PEM files into
a per-process temporary directory, or copied into a directory of your choice::

    pki = tlsca.files()            # cached; same paths on every call
    pki.ca                         # path of the CA certificate (trust root)
    pki.localhost.cert, .key       # CN/SAN localhost, DNS:localhost, IP:127.0.0.1
    pki.wrong_name.cert, .key      # signed by the CA, but for "wrong.example"
    pki.expired.cert, .key         # localhost, signed by the CA, expired
    pki.untrusted.cert, .key       # localhost, signed by another CA

For a Twisted client that trusts the test CA::

    options = tlsca.client_options("localhost")

The private keys are test-only and never leave the temporary directory.
"""

import atexit
import datetime
import functools
import ipaddress
import os
import shutil
import tempfile

import attr


@attr.s(frozen=True, slots=True)
class KeyPair:
    """Paths of a PEM certificate (with the chain up to, not including, the
    root) and of its unencrypted PEM private key."""

    cert = attr.ib()
    key = attr.ib()

    def copy_to(self, directory, name):
        os.makedirs(directory, exist_ok=True)
        cert = os.path.join(directory, name + ".crt")
        key = os.path.join(directory, name + ".key")
        shutil.copyfile(self.cert, cert)
        shutil.copyfile(self.key, key)
        os.chmod(key, 0o600)
        return KeyPair(cert, key)


@attr.s(frozen=True, slots=True)
class TestPKI:
    """The PEM files of the test CA and its certificates."""

    __test__ = False  # not a pytest test class

    directory = attr.ib()
    ca = attr.ib()            # CA certificate path
    ca_pem = attr.ib(repr=False)  # CA certificate bytes
    localhost = attr.ib()     # KeyPair
    wrong_name = attr.ib()    # KeyPair
    expired = attr.ib()       # KeyPair
    untrusted = attr.ib()     # KeyPair
    other_ca = attr.ib()      # path of the CA that signed ``untrusted``

    def copy_to(self, directory):
        """The same files copied into ``directory`` (made when missing)."""
        os.makedirs(directory, exist_ok=True)
        ca = os.path.join(directory, "ca.crt")
        shutil.copyfile(self.ca, ca)
        other = os.path.join(directory, "other-ca.crt")
        shutil.copyfile(self.other_ca, other)
        return TestPKI(
            directory=directory,
            ca=ca,
            ca_pem=self.ca_pem,
            localhost=self.localhost.copy_to(directory, "localhost"),
            wrong_name=self.wrong_name.copy_to(directory, "wrong-name"),
            expired=self.expired.copy_to(directory, "expired"),
            untrusted=self.untrusted.copy_to(directory, "untrusted"),
            other_ca=other,
        )


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fido tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _ca(common_name, now):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key()
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca_key, ca_cert, host, now, expired=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key()
    if expired:
        not_before = now - datetime.timedelta(days=30)
        not_after = now - datetime.timedelta(days=1)
    else:
        not_before = now - datetime.timedelta(days=1)
        not_after = now + datetime.timedelta(days=825)
    names = [x509.DNSName(host)]
    if host == "localhost":
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem_cert(cert):
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key):
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def generate(directory):
    """Generate a fresh CA and certificates into ``directory``; uncached."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    ca_key, ca_cert = _ca("Fido test CA", now)
    other_key, other_cert = _ca("Fido untrusted CA", now)
    ca_pem = _pem_cert(ca_cert)

    def pair(name, key, cert):
        return KeyPair(
            cert=_write(os.path.join(directory, name + ".crt"), _pem_cert(cert)),
            key=_write(os.path.join(directory, name + ".key"), _pem_key(key), 0o600),
        )

    return TestPKI(
        directory=directory,
        ca=_write(os.path.join(directory, "ca.crt"), ca_pem),
        ca_pem=ca_pem,
        localhost=pair("localhost", *_leaf(ca_key, ca_cert, "localhost", now)),
        wrong_name=pair("wrong-name", *_leaf(ca_key, ca_cert, "wrong.example", now)),
        expired=pair("expired", *_leaf(ca_key, ca_cert, "localhost", now, expired=True)),
        untrusted=pair("untrusted", *_leaf(other_key, other_cert, "localhost", now)),
        other_ca=_write(os.path.join(directory, "other-ca.crt"), _pem_cert(other_cert)),
    )


@functools.lru_cache(maxsize=None)
def _cached(pid):
    directory = tempfile.mkdtemp(prefix="fido-pki-")
    os.chmod(directory, 0o755)  # readable by unprivileged server processes
    atexit.register(shutil.rmtree, directory, True)
    return generate(directory)


def files():
    """The process-wide test PKI (generated on first use, then cached)."""
    return _cached(os.getpid())


def client_options(hostname="localhost", ca_pem=None):
    """Twisted ``IOpenSSLClientConnectionCreator`` verifying ``hostname``
    against the test CA (or against the PEM bytes ``ca_pem``)."""
    from twisted.internet import ssl

    pem = ca_pem if ca_pem is not None else files().ca_pem
    return ssl.optionsForClientTLS(hostname, trustRoot=ssl.Certificate.loadPEM(pem))


def ssl_context(ca_pem=None):
    """A stdlib ``ssl.SSLContext`` trusting the test CA, for imaplib asserts."""
    import ssl

    pem = ca_pem if ca_pem is not None else files().ca_pem
    return ssl.create_default_context(cadata=pem.decode("ascii"))
