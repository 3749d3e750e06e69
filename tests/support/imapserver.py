"""What the test IMAP servers (Dovecot, Cyrus, Courier) have in common.

Each server object has the same shape, so one scenario runs on all three::

    server.name, server.version      # "cyrus", "3.6.1"
    server.port                      # plain IMAP, STARTTLS offered
    server.ssl_port                  # implicit TLS
    server.ca_file                   # the test CA that signed its certificate
    server.users                     # {user: password}
    server.add_users({...})
    server.mailbox("Archive")        # the name Fido must use ("INBOX.Archive"
                                     # on Cyrus and Courier, "Archive" on Dovecot)
    server.create_folder(user, "Archive")
    server.add_message(user, raw, folder="INBOX", flags="")
    server.flags(user, folder)       # {message_id: Maildir letters}, e.g. "S"
    server.count(user, folder)       # messages in folder
    server.has_folder(user, folder)
    server.imap(security, user)      # a logged-in stdlib imaplib client

Dovecot provisions and inspects its Maildirs directly (fast); Cyrus and
Courier keep their own indexes, so :class:`ImapBackedServer` does it over
IMAP (APPEND, FETCH FLAGS) as a client would.

Cyrus and Courier are not installed as Debian packages (they conflict with
dovecot-imapd): ``.ci/test-servers`` unpacks them under
``$FIDO_TEST_SERVERS`` (default ``/opt/fido-test-servers``).  They run in
their own PID namespace (``unshare --pid --fork --kill-child``), so stopping
the one process we started takes every process they forked with it.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from tests.support import tlsca
from tests.support.dovecot import FLAG_LETTERS, MailUser, encode_mutf7, free_port, other_free_port

LETTER_FLAGS = {letter: flag for flag, letter in FLAG_LETTERS.items()}


def servers_root():
    """Where ``.ci/test-servers`` unpacked Cyrus and Courier."""
    return os.environ.get("FIDO_TEST_SERVERS", "/opt/fido-test-servers")


def unpacked(name):
    """``(tree, {package: version})`` of an unpacked server, or ``(None, {})``."""
    tree = os.path.join(servers_root(), name)
    try:
        with open(os.path.join(tree, "VERSIONS"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None, {}
    versions = dict(line.split(" ", 1) for line in lines if " " in line)
    return tree, versions


def missing_reason(name, tree, binaries, lib_dirs=()):
    """Why an unpacked server cannot start here, or ``None``.  ``lib_dirs``
    (relative to the tree) are searched for shared libraries, as the server
    will: a library that ``ldd`` cannot find is named in the reason."""
    if tree is None:
        return (f"{name} is not unpacked under {servers_root()}: run .ci/test-servers "
                f"(and install its libraries: .ci/test-servers --libs)")
    if os.geteuid() != 0:
        return f"{name} runs in a private mount/PID namespace: the tests must run as root"
    if shutil.which("unshare") is None:
        return f"{name} needs unshare(1) (util-linux)"
    refused = _namespaces_refused()
    if refused:
        return f"{name} runs in a private mount/PID namespace, which is refused here: {refused}"
    for binary in binaries:
        if not os.access(os.path.join(tree, binary.lstrip("/")), os.X_OK):
            return f"{name}: {binary} missing under {tree}: run .ci/test-servers again"
    missing = _missing_libraries(tree, binaries, lib_dirs)
    if missing:
        return (f"{name} needs {', '.join(missing)}: install the libraries "
                f"`.ci/test-servers --libs` lists (apt-get install)")
    return None


def _namespaces_refused():
    """Why ``unshare`` cannot make the namespaces here (an unprivileged
    container), or ``""``."""
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "--pid",
                               "--fork", "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if done.returncode == 0:
        return ""
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"unshare exited with {done.returncode}"


def _missing_libraries(tree, binaries, lib_dirs):
    if shutil.which("ldd") is None:
        return []
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(os.path.join(tree, d) for d in lib_dirs))
    missing = set()
    for binary in binaries:
        try:
            out = subprocess.run(["ldd", os.path.join(tree, binary.lstrip("/"))], env=env,
                                 capture_output=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.decode("utf-8", "replace").splitlines():
            if "not found" in line:
                missing.add(line.split("=>", 1)[0].strip())
    return sorted(missing)


def debian_version(package_version):
    """``3.6.1-4+deb12u5`` -> ``3.6.1``; ``5.0.13+1.0.16-3+b6`` -> ``5.0.13``."""
    version = package_version.split(":", 1)[-1]
    return version.split("-", 1)[0].split("+", 1)[0]


def quoted(mailbox):
    """A mailbox name for imaplib: modified UTF-7, quoted."""
    return '"' + encode_mutf7(mailbox).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _message_id(header_bytes):
    for line in header_bytes.replace(b"\r\n", b"\n").split(b"\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode("utf-8", "replace")
    return ""


def _letters(flags_text):
    names = flags_text.split()
    return "".join(sorted(FLAG_LETTERS[n] for n in names if n in FLAG_LETTERS))


class ImapBackedServer:
    """Provisioning and inspection over IMAP, plus the process handling shared
    by the unpacked servers.  Subclasses set ``name``, ``prefix`` and implement
    ``_argv()``, ``_register(users)`` and ``version``."""

    name = "?"
    prefix = "INBOX."
    host = "localhost"

    def __init__(self, base_dir=None):
        self._own_base_dir = base_dir is None
        self.base_dir = os.path.abspath(base_dir or tempfile.mkdtemp(prefix=f"fido-{self.name}-"))
        os.chmod(self.base_dir, 0o755)
        self.port = free_port()
        self.ssl_port = other_free_port(self.port)
        self.pki = tlsca.files()
        self.mail_user = MailUser.pick()
        self.users = {}
        self.process = None
        self.log_path = os.path.join(self.base_dir, f"{self.name}.log")

    @property
    def ca_file(self):
        return self.pki.ca

    def describe(self):
        return f"{self.name} {self.version}"

    def mailbox(self, name):
        """The full name of folder ``name`` as a client must use it."""
        return "INBOX" if name.upper() == "INBOX" else self.prefix + name

    # -- process ------------------------------------------------------------

    def _spawn(self, argv, env=None, timeout=20.0):
        full_env = dict(os.environ)
        full_env.update(env or {})
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                # A shell as the namespace's init: the server itself may
                # change credentials, which clears its parent-death signal.
                ["unshare", "--pid", "--fork", "--kill-child=SIGKILL",
                 "sh", "-c", '"$@" & wait', "sh", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=full_env, cwd=self.base_dir, start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"{self.name} exited at start:\n{self.read_log()[-2000:]}")
            if _greets(self.port) and _greets(self.ssl_port, tls=True):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not greet on 127.0.0.1:{self.port} within "
                           f"{timeout:.0f} s:\n{self.read_log()[-2000:]}")

    def stop(self):
        """SIGKILL the namespace's parent: ``--kill-child`` then kills its
        init, and the kernel every process left in that PID namespace."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            for child in _children(process.pid):
                # The namespace's init: killing it kills the namespace.
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.send_signal(signal.SIGKILL)
            process.wait(10)

    def close(self):
        self.stop()
        if self._own_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.close()

    def read_log(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _chown_tree(self, path):
        if os.geteuid() != 0:
            return
        uid, gid = self.mail_user.uid, self.mail_user.gid
        os.chown(path, uid, gid)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid)

    # -- users --------------------------------------------------------------

    def add_user(self, name, password):
        self.add_users({name: password})

    def add_users(self, users):
        for name, password in users.items():
            if not name or any(c in name for c in "./@:\t\r\n ") or not password:
                raise ValueError(f"user names here are plain words: {name!r}")
        self.users.update(users)
        self._register(dict(users))

    # -- IMAP helpers -------------------------------------------------------

    def imap(self, security="starttls", user=None, password=None, timeout=10):
        import imaplib

        context = tlsca.ssl_context()
        if security == "tls":
            client = imaplib.IMAP4_SSL(self.host, self.ssl_port, ssl_context=context,
                                       timeout=timeout)
        else:
            client = imaplib.IMAP4(self.host, self.port, timeout=timeout)
            if security == "starttls":
                client.starttls(ssl_context=context)
        if user is not None:
            client.login(user, password if password is not None else self.users[user])
        return client

    def _session(self, user):
        return self.imap("none", user)

    def create_folder(self, user, name):
        client = self._session(user)
        try:
            typ, data = client.create(quoted(self.mailbox(name)))
            if typ != "OK":
                raise RuntimeError(f"{self.name}: CREATE {name!r} for {user}: {data}")
        finally:
            client.logout()

    def add_message(self, user, raw, folder="INBOX", flags=""):
        if not isinstance(raw, (bytes, bytearray)):
            raise TypeError("raw must be bytes")
        names = " ".join(LETTER_FLAGS[c] for c in flags) if isinstance(flags, str) else \
            " ".join(flags)
        client = self._session(user)
        try:
            typ, data = client.append(quoted(self.mailbox(folder)),
                                      f"({names})" if names else None, None, bytes(raw))
            if typ != "OK":
                raise RuntimeError(f"{self.name}: APPEND to {folder!r} for {user}: {data}")
        finally:
            client.logout()

    def fetch(self, user, folder="INBOX"):
        """``[(uid, letters, message_id)]`` of ``folder``, read-only; ``None``
        when the folder does not exist."""
        client = self._session(user)
        try:
            typ, _ = client.select(quoted(self.mailbox(folder)), readonly=True)
            if typ != "OK":
                return None
            typ, data = client.uid(
                "FETCH", "1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            out = []
            for part in data:
                if not isinstance(part, tuple):
                    continue
                head = part[0].decode("ascii", "replace")
                uid = int(head.split("UID ", 1)[1].split()[0].rstrip(")"))
                flags = head.split("FLAGS (", 1)[1].split(")", 1)[0]
                out.append((uid, _letters(flags), _message_id(part[1])))
            return sorted(out)
        finally:
            client.logout()

    def flags(self, user, folder="INBOX"):
        return {mid: letters for _, letters, mid in self.fetch(user, folder) or ()}

    def count(self, user, folder="INBOX"):
        found = self.fetch(user, folder)
        return None if found is None else len(found)

    def has_folder(self, user, name):
        return self.fetch(user, name) is not None

    def capabilities(self, user):
        return capabilities_after_login(self, user)


def capabilities_after_login(server, user):
    """The CAPABILITY list after a STARTTLS login, as Fido sees it, sorted."""
    client = server.imap("starttls", user)
    try:
        typ, data = client.capability()
        return tuple(sorted(data[0].decode("ascii").upper().split()))
    finally:
        client.logout()


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _greets(port, tls=False):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            if tls:
                import ssl

                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                with context.wrap_socket(s) as t:
                    return t.recv(256).startswith(b"* OK")
            return s.recv(256).startswith(b"* OK")
    except OSError:
        return False
