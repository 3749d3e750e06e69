"""A real Cyrus IMAP server (Debian's cyrus-imapd, unpacked) on free loopback ports.

Everything lives under ``base_dir``: ``imapd.conf`` and ``cyrus.conf``
written here (Debian's defaults where they matter to a client: ``INBOX.``
namespace, ``.`` separator, no alternate namespace), the SASL password
database (``sasldb2``, written with the unpacked ``saslpasswd2``), the
mailbox database and the spool.  ``master -D`` runs in the foreground in its
own PID namespace; services run as the unprivileged mail user
(``cyrus_user``).  Users are created by the admin over IMAP
(``CREATE user.<name>``), messages with APPEND::

    with Cyrus(users={"alice": "secret"}) as server:
        server.add_message("alice", raw)
        ...                               # IMAP on server.port (STARTTLS),
        server.flags("alice")             # implicit TLS on server.ssl_port

Needs root (the PID namespace) and ``.ci/test-servers`` to have unpacked
cyrus-imapd, cyrus-common and sasl2-bin.
"""

import os
import secrets
import subprocess

from tests.support import imapserver

MASTER = "usr/lib/cyrus/bin/master"
IMAPD = "usr/lib/cyrus/bin/imapd"
SASLPASSWD = "usr/sbin/saslpasswd2"
SERVERNAME = "fido-cyrus"  # also the SASL realm of the users
ADMIN = "cyrusadmin"


def find():
    """``(tree, versions, reason)``: reason is ``None`` when Cyrus can start here."""
    tree, versions = imapserver.unpacked("cyrus")
    reason = imapserver.missing_reason("cyrus", tree, [MASTER, IMAPD, SASLPASSWD],
                                       lib_dirs=["usr/lib/x86_64-linux-gnu"])
    return tree, versions, reason


def version():
    _, versions = imapserver.unpacked("cyrus")
    return imapserver.debian_version(versions.get("cyrus-imapd", "?"))


class Cyrus(imapserver.ImapBackedServer):
    name = "cyrus"
    prefix = "INBOX."

    def __init__(self, base_dir=None, users=None):
        tree, _, reason = find()
        if reason:
            raise RuntimeError(reason)
        super().__init__(base_dir)
        self.tree = tree
        self.version = version()
        self.env = {"LD_LIBRARY_PATH": os.path.join(tree, "usr/lib/x86_64-linux-gnu")}
        # conf/socket: imapd binds its end of idled's messages there
        # ({configdirectory}/socket/idle.<pid>, compiled in)
        for sub in ("conf", "conf/socket", "spool", "sieve", "socket", "proc", "lock", "tls"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        cert = self.pki.localhost.copy_to(os.path.join(self.base_dir, "tls"), "localhost")
        self.config_path = os.path.join(self.base_dir, "imapd.conf")
        self.sasldb = os.path.join(self.base_dir, "sasldb2")
        self._admin_password = secrets.token_hex(12)
        self._write_config(cert)
        self._saslpasswd(ADMIN, self._admin_password)
        self._chown_tree(self.base_dir)
        self._pending = dict(users or {})

    def _path(self, relative):
        return os.path.join(self.tree, relative)

    def _write_config(self, cert):
        b = self.base_dir
        u = self.mail_user.name
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(f"""\
# Written by tests/support/cyrus.py: a throwaway test server.
configdirectory: {b}/conf
proc_path: {b}/proc
mboxname_lockpath: {b}/lock
defaultpartition: default
partition-default: {b}/spool
sievedir: {b}/sieve
lmtpsocket: {b}/socket/lmtp
idlesocket: {b}/conf/socket/idle
notifysocket: {b}/socket/notify
servername: {SERVERNAME}
cyrus_user: {u}
admins: {ADMIN}
altnamespace: no
unixhierarchysep: no
hashimapspool: true
allowanonymouslogin: no
allowplaintext: yes
autocreate_quota: 0
umask: 077
failedloginpause: 0
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {self.sasldb}
sasl_mech_list: PLAIN LOGIN
sasl_auto_transition: no
tls_server_cert: {cert.cert}
tls_server_key: {cert.key}
tls_session_timeout: 1440
syslog_prefix: fido-cyrus-{self.port}
""")
        bin_dir = self._path("usr/lib/cyrus/bin")
        with open(os.path.join(b, "cyrus.conf"), "w", encoding="utf-8") as f:
            f.write(f"""\
START {{
  recover cmd="{bin_dir}/ctl_cyrusdb -C {self.config_path} -r"
}}
SERVICES {{
  imap cmd="{bin_dir}/imapd -C {self.config_path}" listen="127.0.0.1:{self.port}" prefork=1
  imaps cmd="{bin_dir}/imapd -s -C {self.config_path}" listen="127.0.0.1:{self.ssl_port}" prefork=1
}}
EVENTS {{
}}
DAEMON {{
  idled cmd="{bin_dir}/idled -C {self.config_path}"
}}
""")

    def _saslpasswd(self, user, password):
        env = dict(os.environ, **self.env)
        subprocess.run(
            [self._path(SASLPASSWD), "-p", "-c", "-f", self.sasldb, "-u", SERVERNAME, user],
            input=password.encode("utf-8"), env=env, check=True, capture_output=True,
        )
        if os.geteuid() == 0:
            os.chown(self.sasldb, self.mail_user.uid, self.mail_user.gid)

    def start(self, timeout=20.0):
        if self.process is not None:
            raise RuntimeError("already started")
        self._spawn([
            self._path(MASTER), "-C", self.config_path,
            "-M", os.path.join(self.base_dir, "cyrus.conf"),
            "-p", os.path.join(self.base_dir, "master.pid"), "-D",
        ], env=self.env, timeout=timeout)
        pending, self._pending = self._pending, {}
        if pending:
            self.add_users(pending)
        return self

    def _register(self, users):
        for name, password in users.items():
            self._saslpasswd(name, password)
        if self.process is None:
            self._pending.update(users)
            return
        admin = self.imap("none", ADMIN, self._admin_password)
        try:
            for name in users:
                typ, data = admin.create(f"user.{name}")
                if typ != "OK" and b"already exists" not in b" ".join(data).lower():
                    raise RuntimeError(f"cyrus: CREATE user.{name}: {data}")
        finally:
            admin.logout()
