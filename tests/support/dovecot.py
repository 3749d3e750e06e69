"""A real Dovecot IMAP server on free loopback ports, for tests and benches.

Everything lives under one ``base_dir``: the configuration, the runtime
sockets, the state, the log (``base_dir/dovecot.log``), the passwd-files and
the Maildirs (``base_dir/mail/<user>``).  Nothing system-wide is read or
written (no ``/etc/dovecot``, no ``/run/dovecot``), and the server is stopped
by its own pid::

    server = Dovecot(base_dir, users={"alice": "secret"}).start()
    server.add_message("alice", make_message(1, 4096))
    ...                                  # IMAP on server.port (STARTTLS) and
    ...                                  # server.ssl_port (implicit TLS)
    server.flags("alice")                # {"<fido.1.4096@fido.test>": "S"}
    server.stop()

Messages are provisioned by writing Maildir files directly (fast; Dovecot
indexes them on the next SELECT) and server state is asserted by reading the
Maildir back: flags live in the file names (``:2,<letters>``), UIDs in
``dovecot-uidlist``.

Dovecot refuses to run mail processes as root, so as root the mail files,
the login and the internal processes belong to an unprivileged user
(``fidotest`` when it exists, else ``nobody``); as a normal user everything
runs as that user.
"""

import contextlib
import grp
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import attr

from tests.support import tlsca
from tests.support.redis_server import free_port, require  # noqa: F401 - re-exported


def other_free_port(*taken):
    """A free loopback port that is none of ``taken``: the kernel may hand
    out the port it just gave (a closed probe socket), and a server
    configured with one port twice refuses to start ("duplicate listener")."""
    while True:
        port = free_port()
        if port not in taken:
            return port


# Maildir info letters, in the order Maildir requires (ASCII order).
FLAG_LETTERS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}

# (share, size in bytes, with a base64 attachment): the bench's message mix.
DEFAULT_MIX = (
    (0.80, 4 * 1024, False),
    (0.18, 40 * 1024, False),
    (0.02, 1024 * 1024, True),
)

_counter_lock = threading.Lock()
_counter = [0]


def find_dovecot():
    """Path of the ``dovecot`` master binary, or ``None``."""
    found = shutil.which("dovecot")
    if found:
        return found
    for candidate in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def version(binary=None):
    """Dovecot's version (``2.3.19.1``), or ``"?"`` when it is not installed."""
    binary = binary or find_dovecot()
    if binary is None:
        return "?"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.decode("ascii", "replace").split()[0] if out.strip() else "?"


@attr.s(frozen=True, slots=True)
class MailUser:
    """The system identity owning mail files and running Dovecot's helpers."""

    name = attr.ib()
    uid = attr.ib()
    gid = attr.ib()
    group = attr.ib()

    @classmethod
    def pick(cls):
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
            gid = os.getegid()
        else:
            for candidate in ("fidotest", "nobody"):
                try:
                    entry = pwd.getpwnam(candidate)
                    break
                except KeyError:
                    continue
            else:
                raise RuntimeError("running as root needs an unprivileged user 'nobody'")
            gid = entry.pw_gid
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
        return cls(entry.pw_name, entry.pw_uid, gid, group)


@attr.s(frozen=True, slots=True)
class MaildirEntry:
    """One message file in a Maildir, as Dovecot left it."""

    path = attr.ib()
    base = attr.ib()          # file name without the ":2," info part
    subdir = attr.ib()        # "new" or "cur"
    flags = attr.ib()         # Maildir letters, e.g. "ST"
    uid = attr.ib()           # int from dovecot-uidlist, or None when not yet indexed
    message_id = attr.ib()    # Message-ID header value, or ""

    def read(self):
        with open(self.path, "rb") as f:
            return f.read()


class Dovecot:
    """A Dovecot master process with a self-contained configuration.

    ``users`` maps user names to plain passwords.  ``port`` serves IMAP with
    STARTTLS available (and plain-text logins allowed, so Fido's ``none``
    security can be tested), ``ssl_port`` serves implicit TLS.  ``tls=False``
    turns TLS off entirely (no STARTTLS, no ``ssl_port``).  ``cert`` is a
    :class:`tlsca.KeyPair`; by default the test CA's ``localhost`` one.
    ``extra_config`` is appended verbatim to ``dovecot.conf`` (later settings
    win).  ``sessions`` sizes the process and client limits.
    """

    name = "dovecot"
    prefix = ""  # namespace inbox: prefix = "" (see _write_config)

    def __init__(self, base_dir=None, users=None, port=None, ssl_port=None, tls=True,
                 cert=None, extra_config="", binary=None, sessions=2000):
        self.binary = binary or find_dovecot()
        if self.binary is None:
            raise RuntimeError("dovecot is not installed")
        self._own_base_dir = base_dir is None
        self.base_dir = os.path.abspath(base_dir or tempfile.mkdtemp(prefix="fido-dovecot-"))
        self.tls = tls
        self.port = port or free_port()
        self.ssl_port = (ssl_port or other_free_port(self.port)) if tls else None
        self.pki = tlsca.files()
        self.cert = cert or self.pki.localhost
        self.extra_config = extra_config
        self.sessions = sessions
        self.mail_user = MailUser.pick()
        self.users = {}
        self.process = None
        self.mail_dir = os.path.join(self.base_dir, "mail")
        self.config_path = os.path.join(self.base_dir, "dovecot.conf")
        self.log_path = os.path.join(self.base_dir, "dovecot.log")
        # One passwd-file per user: Dovecot re-checks a passwd-file at most
        # once a second, so a user added right after another login would be
        # missed in a shared file; a new per-user file is read at once.
        self.passwd_dir = os.path.join(self.base_dir, "passwd.d")
        self.state_dir = os.path.join(self.base_dir, "state")
        # Unix socket paths are limited to ~107 bytes: keep the runtime
        # directory short even when base_dir is a long pytest tmp_path.
        run_dir = os.path.join(self.base_dir, "run")
        if len(run_dir) > 60:
            run_dir = tempfile.mkdtemp(prefix="fido-dc-")
            self._own_run_dir = True
        else:
            self._own_run_dir = False
        self.run_dir = run_dir
        self._prepare_dirs()
        for name, password in (users or {}).items():
            self.users[name] = password
        self._write_passwd()
        for name in self.users:
            self._ensure_user_dir(name)
        self._write_config()

    @property
    def version(self):
        """``2.3.19.1``: from ``dovecot --version``."""
        return version(self.binary)

    def describe(self):
        return f"{self.name} {self.version}"

    def mailbox(self, name):
        """The full name of folder ``name`` as a client uses it (no prefix here)."""
        return "INBOX" if name.upper() == "INBOX" else self.prefix + name

    def capabilities(self, user):
        """CAPABILITY after a STARTTLS login, sorted (tests/support/imapserver.py)."""
        from tests.support.imapserver import capabilities_after_login

        return capabilities_after_login(self, user)

    # -- files ------------------------------------------------------------

    @property
    def ca_file(self):
        """The trust root for clients (the test CA's PEM path)."""
        return self.pki.ca

    def _chown(self, path):
        if os.geteuid() == 0:
            os.chown(path, self.mail_user.uid, self.mail_user.gid)

    def _prepare_dirs(self):
        for path in (self.base_dir, self.run_dir, self.state_dir, self.mail_dir):
            os.makedirs(path, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        os.chmod(self.run_dir, 0o755)
        self._chown(self.mail_dir)
        if os.geteuid() == 0:
            _make_traversable(self.mail_dir)

    def _write_passwd(self, names=None):
        os.makedirs(self.passwd_dir, exist_ok=True)
        os.chmod(self.passwd_dir, 0o755)
        for name in self.users if names is None else names:
            password = self.users[name]
            _check_field("user name", name)
            _check_field("password", password)
            path = os.path.join(self.passwd_dir, _safe_name(name))
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"{name}:{{PLAIN}}{password}::::::\n")
            self._chown(tmp)  # read by the auth process, which runs unprivileged
            os.replace(tmp, path)

    def _write_config(self):
        u = self.mail_user
        sessions = max(int(self.sessions), 100)
        # One imap process per session, as on real servers (imap's default
        # service_count = 1 makes client_limit > 1 meaningless).
        imap_processes = sessions + 100
        login_processes = 4
        login_clients = sessions + 100
        listeners = [
            f"  inet_listener imap {{\n    address = 127.0.0.1\n    port = {self.port}\n  }}",
        ]
        if self.tls:
            listeners.append(
                f"  inet_listener imaps {{\n    address = 127.0.0.1\n    port = {self.ssl_port}\n"
                "    ssl = yes\n  }"
            )
            ssl_block = (
                "ssl = yes\n"
                f"ssl_cert = <{self.cert.cert}\n"
                f"ssl_key = <{self.cert.key}\n"
                "ssl_min_protocol = TLSv1.2\n"
                "ssl_prefer_server_ciphers = yes\n"
            )
        else:
            ssl_block = "ssl = no\n"
        listeners = "\n".join(listeners)
        config = f"""\
# Written by tests/support/dovecot.py: a throwaway test server.
base_dir = {self.run_dir}
state_dir = {self.state_dir}
instance_name = fido-test-{self.port}
log_path = {self.log_path}
info_log_path = {self.log_path}
protocols = imap
listen = 127.0.0.1
shutdown_clients = yes
{ssl_block}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
auth_cache_size = 0
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c

default_internal_user = {u.name}
default_internal_group = {u.group}
default_login_user = {u.name}
first_valid_uid = {u.uid}
last_valid_uid = {u.uid}
first_valid_gid = {u.gid}
last_valid_gid = {u.gid}
mail_uid = {u.uid}
mail_gid = {u.gid}
mail_location = maildir:{self.mail_dir}/%u
mail_fsync = never
maildir_stat_dirs = yes

namespace inbox {{
  inbox = yes
  prefix =
  separator = .
}}

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_dir}/%u
}}
userdb {{
  driver = static
  args = uid={u.uid} gid={u.gid} home={self.mail_dir}/%u
}}

default_process_limit = {imap_processes + 100}
default_client_limit = {login_clients * 2}
default_vsz_limit = 512M

protocol imap {{
  mail_max_userip_connections = 10000
}}

service imap-login {{
{listeners}
  chroot =
  service_count = 0
  process_min_avail = 1
  process_limit = {login_processes}
  client_limit = {login_clients}
  vsz_limit = 1G
}}
service imap {{
  process_limit = {imap_processes}
  client_limit = 1
}}
service anvil {{
  chroot =
  # No auth penalty: tests log in with wrong passwords, then right ones.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
  client_limit = {login_clients * 2 + 100}
}}
service auth {{
  client_limit = {login_clients * 2 + 100}
}}
service stats {{
  client_limit = {imap_processes + login_clients * 2}
}}
service pop3-login {{
  chroot =
}}
service submission-login {{
  chroot =
}}
service imap-urlauth-login {{
  chroot =
}}
service managesieve-login {{
  chroot =
}}
"""
        if self.extra_config:
            config += "\n# extra_config\n" + self.extra_config + "\n"
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(config)

    # -- process ----------------------------------------------------------

    def start(self, timeout=15.0):
        """Start the master in the foreground and wait for the IMAP greeting."""
        if self.process is not None:
            raise RuntimeError("already started")
        self._write_config()
        self.process = subprocess.Popen(
            [self.binary, "-F", "-c", self.config_path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode("utf-8", "replace")
                self.process = None
                raise RuntimeError(
                    f"dovecot exited: {err.strip()}\n{self.read_log()[-2000:]}"
                )
            if self._greets(self.port) and (not self.tls or self._accepts(self.ssl_port)):
                return self
            time.sleep(0.02)
        log = self.read_log()[-2000:]
        self.stop()
        raise RuntimeError(f"dovecot did not greet on port {self.port} in time\n{log}")

    @staticmethod
    def _greets(port):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                return s.recv(256).startswith(b"* OK")
        except OSError:
            return False

    @staticmethod
    def _accepts(port):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            return False

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def stop(self, grace=0.3):
        """SIGTERM the master (it stops its children), SIGKILL its whole
        process group after ``grace`` seconds.

        Dovecot's master lingers a second for its log process after the
        other children are gone; a test server has nothing left to save by
        then, so a short grace keeps test teardown fast.
        """
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                # Started in its own session: this reaches only its children.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def close(self):
        """Stop and delete the directories this object created."""
        self.stop()
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._own_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.close()

    def read_log(self):
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- users and folders --------------------------------------------------

    def add_user(self, name, password):
        """Add a user; the running server sees it at the next login.

        Changing the password of a user who logged in during the last
        second may take up to a second to be seen (Dovecot re-checks a
        passwd-file at most once a second).
        """
        self.add_users({name: password})

    def add_users(self, users):
        self.users.update(users)
        self._write_passwd(list(users))
        for name in users:
            self._ensure_user_dir(name)

    def remove_user(self, name):
        """Remove a user's password entry (not its mail): logins then fail."""
        self.users.pop(name, None)
        try:
            os.unlink(os.path.join(self.passwd_dir, _safe_name(name)))
        except FileNotFoundError:
            pass

    def user_dir(self, user):
        _check_field("user name", user)
        if "/" in user or user in (".", ".."):
            raise ValueError("user names with '/' are not supported")
        return os.path.join(self.mail_dir, user)

    def folder_dir(self, user, folder="INBOX"):
        """The Maildir directory of ``folder`` (Maildir++ layout, "." separator)."""
        root = self.user_dir(user)
        if folder.upper() == "INBOX":
            return root
        return os.path.join(root, "." + encode_mutf7(folder))

    def _ensure_user_dir(self, user):
        root = self.user_dir(user)
        if not os.path.isdir(os.path.join(root, "cur")):
            self._make_maildir(root)
        return root

    def _make_maildir(self, path):
        os.makedirs(path, exist_ok=True)
        self._chown(path)
        for sub in ("cur", "new", "tmp"):
            p = os.path.join(path, sub)
            os.makedirs(p, exist_ok=True)
            self._chown(p)

    def create_folder(self, user, name):
        """Create a mailbox (``Archive``, ``Archive.2024``...) for ``user``."""
        self._ensure_user_dir(user)
        path = self.folder_dir(user, name)
        self._make_maildir(path)
        marker = os.path.join(path, "maildirfolder")
        open(marker, "ab").close()
        self._chown(marker)
        return path

    def reset(self, user, uidvalidity=None):
        """Delete the user's whole Maildir and recreate an empty INBOX.

        ``uidvalidity`` sets the INBOX's next UIDVALIDITY (else Dovecot picks
        one from the clock, which may repeat within a second).
        """
        root = self.user_dir(user)
        shutil.rmtree(root, ignore_errors=True)
        self._make_maildir(root)
        if uidvalidity is not None:
            self.set_uidvalidity(user, uidvalidity)

    def set_uidvalidity(self, user, uidvalidity, folder="INBOX"):
        """Give a not yet indexed folder this UIDVALIDITY (writes its uidlist)."""
        path = os.path.join(self.folder_dir(user, folder), "dovecot-uidlist")
        with open(path, "w", encoding="ascii") as f:
            f.write(f"3 V{int(uidvalidity)} N1 G{os.urandom(16).hex()}\n")
        self._chown(path)

    # -- messages -----------------------------------------------------------

    def add_message(self, user, raw, folder="INBOX", flags=""):
        """Deliver ``raw`` (bytes, as the server should serve them: use CRLF)
        into ``folder`` with Maildir ``flags`` ("S", "ST"...) or IMAP flag
        names (``["\\\\Seen"]``).  Returns the file's base name.
        """
        if not isinstance(raw, (bytes, bytearray)):
            raise TypeError("raw must be bytes")
        letters = _flag_letters(flags)
        folder_path = self.folder_dir(user, folder)
        if folder.upper() == "INBOX":
            self._ensure_user_dir(user)
        elif not os.path.isdir(os.path.join(folder_path, "cur")):
            self.create_folder(user, folder)
        size = len(raw)
        vsize = size + raw.count(b"\n") - raw.count(b"\r\n")
        base = f"{_unique()},S={size},W={vsize}"
        tmp = os.path.join(folder_path, "tmp", base)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        self._chown(tmp)
        if letters:
            final = os.path.join(folder_path, "cur", f"{base}:2,{letters}")
        else:
            final = os.path.join(folder_path, "new", base)
        os.rename(tmp, final)
        return base

    def provision(self, n_accounts, m_messages, mix=DEFAULT_MIX, prefix="user",
                  password="password", seed=0, domain="fido.test"):
        """Create ``n_accounts`` users, each with an INBOX of ``m_messages``
        fresh messages drawn from ``mix`` ((share, size, attachment), ...).

        Deterministic for a given ``seed``: calling it again resets every
        mailbox to the same mail.  Returns ``{user: password}`` in order.
        """
        users = {f"{prefix}{k:04d}@{domain}": f"{password}{k}" for k in range(n_accounts)}
        self.add_users(users)
        plan = message_plan(n_accounts * m_messages, mix, seed)
        i = 0
        for user in users:
            self.reset(user)
            for _ in range(m_messages):
                size, attachment = plan[i]
                self.add_message(user, make_message(i, size, attachment=attachment, tag=seed))
                i += 1
        return users

    def entries(self, user, folder="INBOX"):
        """The messages in ``folder``'s Maildir (:class:`MaildirEntry`), sorted by UID."""
        path = self.folder_dir(user, folder)
        uids = _read_uidlist(os.path.join(path, "dovecot-uidlist"))
        found = []
        for sub in ("new", "cur"):
            directory = os.path.join(path, sub)
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                base, _, info = name.partition(":2,")
                file_path = os.path.join(directory, name)
                try:
                    message_id = _message_id(file_path)
                except FileNotFoundError:  # renamed by Dovecot meanwhile
                    return self.entries(user, folder)
                found.append(MaildirEntry(
                    path=file_path, base=base, subdir=sub,
                    flags="".join(sorted(info)), uid=uids.get(base),
                    message_id=message_id,
                ))
        found.sort(key=lambda e: (e.uid is None, e.uid or 0, e.base))
        return found

    def flags(self, user, folder="INBOX"):
        """``{message_id (or file base name): maildir letters}``, e.g.
        ``{"<fido.1.4096.0@fido.test>": "S"}``; S = \\Seen, T = \\Deleted,
        F = \\Flagged, R = \\Answered, D = \\Draft."""
        return {(e.message_id or e.base): e.flags for e in self.entries(user, folder)}

    def flags_by_uid(self, user, folder="INBOX"):
        """``{uid: letters}`` for messages Dovecot has indexed."""
        return {e.uid: e.flags for e in self.entries(user, folder) if e.uid is not None}

    def has_folder(self, user, folder):
        return os.path.isdir(os.path.join(self.folder_dir(user, folder), "cur"))

    def count(self, user, folder="INBOX"):
        """How many messages are in ``folder`` (expunged ones are gone)."""
        path = self.folder_dir(user, folder)
        total = 0
        for sub in ("new", "cur"):
            try:
                total += len(os.listdir(os.path.join(path, sub)))
            except FileNotFoundError:
                pass
        return total

    # -- clients ------------------------------------------------------------

    def imap(self, security="starttls", user=None, password=None, timeout=10):
        """A logged-in (when ``user`` is given) stdlib ``imaplib`` client,
        verifying the server against the test CA: for asserts in tests."""
        import imaplib

        context = tlsca.ssl_context()
        if security == "tls":
            client = imaplib.IMAP4_SSL("localhost", self.ssl_port, ssl_context=context,
                                       timeout=timeout)
        else:
            client = imaplib.IMAP4("localhost", self.port, timeout=timeout)
            if security == "starttls":
                client.starttls(ssl_context=context)
        if user is not None:
            client.login(user, password if password is not None else self.users[user])
        return client


@contextlib.contextmanager
def started(base_dir=None, **kwargs):
    """A started :class:`Dovecot`, stopped (and its own temporary
    directories removed) on exit.  Skips the test when Dovecot is not
    installed, fails it when ``CI=true``."""
    binary = require("dovecot", kwargs.pop("binary", None) or find_dovecot())
    if os.geteuid() == 0:
        # As root the mail processes run as an unprivileged user, who must
        # reach base_dir; pytest's tmp_path lies under /tmp/pytest-of-root,
        # which every pytest process that starts resets to mode 0700.  So
        # as root the server lives in a directory of its own under /tmp.
        base_dir = None
    server = Dovecot(None if base_dir is None else str(base_dir), binary=binary, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.close()


# -- sample messages ----------------------------------------------------------


def message_plan(total, mix=DEFAULT_MIX, seed=0):
    """``[(size, attachment)] * total`` following ``mix`` shares exactly
    (rounded), in a deterministic shuffled order."""
    shares = [share for share, _, _ in mix]
    scale = sum(shares)
    counts = [int(round(total * share / scale)) for share in shares]
    # Fix rounding so the counts add up to total; adjust the biggest share.
    biggest = max(range(len(counts)), key=lambda k: shares[k])
    counts[biggest] += total - sum(counts)
    plan = []
    for count, (_, size, attachment) in zip(counts, mix):
        plan.extend([(size, attachment)] * count)
    random.Random(seed).shuffle(plan)
    return plan


_FILLER_ASCII = b"The quick brown fox jumps over the lazy dog. 0123456789 "
_FILLER_8BIT = "Caf\u00e9 cr\u00e8me, na\u00efve \u00fcber stra\u00dfe \u20ac ".encode("utf-8")


def make_message(i, size, attachment=False, eight_bit=False, tag=0,
                 sender="Sender <sender@fido.test>", to="Support <support@fido.test>",
                 subject=None, message_id=None):
    """A deterministic RFC 5322 message of exactly ``size`` bytes when
    possible (at least its headers), CRLF line ends, unique Message-ID
    ``<fido.<i>.<size>.<tag>@fido.test>``.

    ``attachment`` makes it multipart/mixed with a base64 part taking most of
    the size; ``eight_bit`` adds raw 8-bit bytes (UTF-8 and a lone Latin-1
    byte, Content-Transfer-Encoding: 8bit) to the text.
    """
    if message_id is None:
        message_id = f"<fido.{i}.{size}.{tag}@fido.test>"
    if subject is None:
        subject = f"Test message {i}"
    day = 1 + i % 28
    seconds = i % 86400
    date = "%s, %02d Nov 2026 %02d:%02d:%02d +0000" % (
        ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")[(day - 1 + 0) % 7],
        day, seconds // 3600, seconds // 60 % 60, seconds % 60,
    )
    headers = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
    ]
    charset = "utf-8"
    cte = "8bit" if eight_bit else "7bit"
    intro = f"Hello,\r\n\r\nthis is test message {i}.\r\n".encode("ascii")
    if eight_bit:
        intro += "Gr\u00fc\u00dfe aus K\u00f6ln, \u65e5\u672c\u8a9e.\r\n".encode("utf-8")
        intro += b"A lone Latin-1 byte: caf\xe9.\r\n"
    filler_unit = _FILLER_8BIT if eight_bit else _FILLER_ASCII

    if not attachment:
        head = ("\r\n".join(headers + [
            f"Content-Type: text/plain; charset={charset}",
            f"Content-Transfer-Encoding: {cte}",
        ]) + "\r\n\r\n").encode("ascii")
        fixed = head + intro
        return fixed + _filler(size - len(fixed), filler_unit)

    boundary = f"=_fido_{i}_{tag}"
    head = ("\r\n".join(headers + [
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
    ]) + "\r\n\r\nThis is a multi-part message in MIME format.\r\n\r\n").encode("ascii")
    text_head = (
        f"--{boundary}\r\n"
        f"Content-Type: text/plain; charset={charset}\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n"
    ).encode("ascii")
    att_head = (
        f"\r\n--{boundary}\r\n"
        "Content-Type: application/octet-stream; name=\"data.bin\"\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        "Content-Disposition: attachment; filename=\"data.bin\"\r\n\r\n"
    ).encode("ascii")
    tail = f"--{boundary}--\r\n".encode("ascii")
    fixed = head + text_head + intro + att_head + tail
    room = size - len(fixed) - 200  # leave some room for the text filler
    raw_len = max(0, room * 57 // 78)
    payload = _b64_lines(random.Random(f"{i}.{size}.{tag}").randbytes(raw_len))
    body = head + text_head + intro
    rest = att_head + payload + tail
    return body + _filler(size - len(body) - len(rest), filler_unit) + rest


def _b64_lines(data):
    import base64

    encoded = base64.b64encode(data)
    return b"".join(encoded[k:k + 76] + b"\r\n" for k in range(0, len(encoded), 76))


def _filler(n, unit):
    """Exactly ``n`` bytes (when n >= 2) of CRLF-terminated text lines."""
    if n < 2:
        return b""
    line_len = 76  # including CRLF: 74 content bytes, cut on a char boundary
    stream = unit * (line_len // len(unit) + 2)
    lines = []
    while n > 0:
        take = min(n, line_len)
        if n - take == 1:  # never leave a single byte: shorten this line
            take -= 1
        content = _cut(stream, take - 2)
        lines.append(content + b"\r\n")
        n -= len(content) + 2
    return b"".join(lines)


def _cut(data, k):
    """The first ``k`` bytes of ``data``, padded with spaces instead of
    splitting a UTF-8 character."""
    piece = data[:k].decode("utf-8", "ignore").encode("utf-8")
    return piece + b" " * (k - len(piece))


# -- helpers ------------------------------------------------------------------


def _check_field(what, value):
    if not value or any(c in value for c in ":\r\n\0"):
        raise ValueError(f"{what} must be non-empty without ':' or line breaks")


def _safe_name(name):
    if "/" in name or name in (".", ".."):
        raise ValueError("user names with '/' are not supported")
    return name


def _flag_letters(flags):
    if isinstance(flags, str):
        letters = set(flags)
    else:
        letters = set()
        for flag in flags:
            if flag not in FLAG_LETTERS:
                raise ValueError(f"unknown flag {flag!r}")
            letters.add(FLAG_LETTERS[flag])
    bad = letters - set("DFPRST")
    if bad:
        raise ValueError(f"unknown Maildir flag letters {''.join(sorted(bad))!r}")
    return "".join(sorted(letters))


def _unique():
    now = time.time()
    with _counter_lock:
        _counter[0] += 1
        n = _counter[0]
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{n}.{host}"


def _read_uidlist(path):
    """``{file base name: uid}`` from a dovecot-uidlist (version 3 or 1)."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}
    uids = {}
    for line in lines[1:]:
        if not line or not line[0].isdigit():
            continue
        uid_text, _, rest = line.partition(" ")
        if ":" in rest:
            base = rest.split(":", 1)[1]  # v3: "<uid> <ext>... :<base>"
        else:
            base = rest.strip()           # v1: "<uid> <base>"
        uids[base.partition(":2,")[0]] = int(uid_text)
    return uids


_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\s*$", re.I | re.M)


def _message_id(path):
    with open(path, "rb") as f:
        head = f.read(16384)
    head = head.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    match = _MESSAGE_ID.search(head)
    return match.group(1).decode("utf-8", "replace") if match else ""


def _make_traversable(path):
    """As root, let the unprivileged mail user reach ``path``: add the
    search (x) permission for others on ancestors that lack it (pytest's
    ``/tmp/pytest-of-root`` is 0700).  No read permission is added."""
    path = os.path.abspath(path)
    parts = []
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            break
        parts.append(parent)
        path = parent
    for directory in parts:
        try:
            mode = os.stat(directory).st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)


def encode_mutf7(name):
    """IMAP modified UTF-7 (RFC 3501 5.1.3) for a mailbox name."""
    import base64

    out = []
    pending = []

    def flush():
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _server_for_cli(argv):  # pragma: no cover - manual use
    """``python -m tests.support.dovecot [USER PASSWORD]``: run one until ^C."""
    users = {argv[0]: argv[1]} if len(argv) >= 2 else {"alice": "secret"}
    with Dovecot(users=users) as server:
        print(f"imap 127.0.0.1:{server.port} imaps 127.0.0.1:{server.ssl_port} "
              f"ca {server.ca_file} dir {server.base_dir} users {list(users)}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    _server_for_cli(sys.argv[1:])
