"""A real Courier-IMAP server (Debian's courier-imap, unpacked) on free loopback ports.

Courier's binaries have their paths compiled in (``/etc/courier``,
``/run/courier/authdaemon/socket``, ``/usr/lib/courier-authlib``), so the
server runs in a private mount and PID namespace where, read-only
overlays put the unpacked package over ``/usr`` and a private
``base_dir/etc`` (``authdaemonrc``, the userdb, the certificate, a
``passwd`` with the ``courier`` user STARTTLS drops to) over ``/etc``, and
``base_dir/run`` is bind-mounted on ``/run``.  Nothing outside the namespace
changes.  In it run ``authdaemond`` (module authuserdb) and two
``couriertcpd``: one for plain IMAP with STARTTLS, one for implicit TLS
through ``couriertls``, the way Debian's init scripts start them.

Users live in ``base_dir/state/userdb.dat`` (written with Courier's own
``makedatprog``; passwords as ``{SHA256}``) and in Maildirs
``base_dir/mail/<user>/Maildir`` owned by the unprivileged mail user::

    with Courier(users={"alice": "secret"}) as server:
        server.add_message("alice", raw)
        server.flags("alice")

Needs root (the namespaces) and ``.ci/test-servers`` to have unpacked
courier-imap and courier-authlib.
"""

import base64
import hashlib
import os
import subprocess

from tests.support import imapserver

IMAPD = "usr/bin/imapd"
COURIERTCPD = "usr/sbin/couriertcpd"
AUTHDAEMOND = "usr/lib/courier/courier-authlib/authdaemond"
MAKEDAT = "usr/lib/courier/courier-authlib/makedatprog"
MAILDIRMAKE = "usr/bin/maildirmake.courier"
#: Debian's IMAP_CAPABILITY (/etc/courier/imapd)
CAPABILITY = ("IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT THREAD=REFERENCES "
              "SORT QUOTA IDLE")


def find():
    tree, versions = imapserver.unpacked("courier")
    reason = imapserver.missing_reason(
        "courier", tree, [IMAPD, COURIERTCPD, AUTHDAEMOND, MAKEDAT, MAILDIRMAKE],
        lib_dirs=["usr/lib/x86_64-linux-gnu", "usr/lib"])
    return tree, versions, reason


def version():
    _, versions = imapserver.unpacked("courier")
    return imapserver.debian_version(versions.get("courier-imap", "?"))


class Courier(imapserver.ImapBackedServer):
    name = "courier"
    prefix = "INBOX."

    def __init__(self, base_dir=None, users=None):
        tree, _, reason = find()
        if reason:
            raise RuntimeError(reason)
        super().__init__(base_dir)
        self.tree = tree
        self.version = version()
        self.env = {"LD_LIBRARY_PATH": ":".join(
            os.path.join(tree, p) for p in ("usr/lib/x86_64-linux-gnu", "usr/lib"))}
        b = self.base_dir
        self.etc = os.path.join(b, "etc", "courier")
        self.state = os.path.join(b, "state")
        self.mail_dir = os.path.join(b, "mail")
        for path in (self.etc, self.state, self.mail_dir,
                     os.path.join(b, "run", "courier", "authdaemon")):
            os.makedirs(path, exist_ok=True)
        os.chmod(self.mail_dir, 0o755)
        self._write_etc()
        self.users.update(users or {})
        self._write_userdb()
        for name in self.users:
            self._make_maildir(name)

    def _path(self, relative):
        return os.path.join(self.tree, relative)

    def _write_etc(self):
        b = self.base_dir
        u = self.mail_user
        cert = self.pki.localhost
        pem = os.path.join(self.etc, "imapd.pem")
        with open(cert.key, "rb") as k, open(cert.cert, "rb") as c:
            data = k.read() + c.read()
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if os.geteuid() == 0:
            os.chown(pem, u.uid, u.gid)  # couriertls reads it after dropping to "courier"
        with open(os.path.join(self.etc, "authdaemonrc"), "w") as f:
            f.write('authmodulelist="authuserdb"\ndaemons=2\n'
                    'authdaemonvar=/run/courier/authdaemon\nDEBUG_LOGIN=0\n'
                    'DEFAULTOPTIONS=""\nLOGGEROPTS=""\n')
        # The userdb is read through symlinks out of the overlay, so it can
        # be rewritten while the server runs.
        for name in ("userdb.dat", "userdbshadow.dat"):
            link = os.path.join(self.etc, name)
            if not os.path.islink(link):
                os.symlink(os.path.join(self.state, name), link)
        # STARTTLS runs couriertls as user "courier" (compiled in).
        with open("/etc/passwd") as f:
            passwd = f.read()
        with open("/etc/group") as f:
            group = f.read()
        with open(os.path.join(b, "etc", "passwd"), "w") as f:
            f.write(passwd + f"courier:x:{u.uid}:{u.gid}:Courier test:/nonexistent:/bin/false\n")
        with open(os.path.join(b, "etc", "group"), "w") as f:
            f.write(group + f"courier:x:{u.gid}:\n")
        open(os.path.join(b, "tlscache"), "ab").close()
        if os.geteuid() == 0:
            os.chown(os.path.join(b, "tlscache"), u.uid, u.gid)
        tcpd = ("/usr/sbin/couriertcpd -address=127.0.0.1 -nodnslookup -noidentlookup "
                "-maxprocs=200 -maxperip=200")
        login = "/usr/lib/courier/courier/imaplogin /usr/bin/imapd Maildir"
        with open(os.path.join(b, "launch.sh"), "w") as f:
            f.write(f"""\
# Written by tests/support/courier.py; runs as PID 1 of a private namespace.
set -e
mount -t overlay fido-usr -o lowerdir={self.tree}/usr:/usr /usr
mount -t overlay fido-etc -o lowerdir={b}/etc:{self.tree}/etc:/etc /etc
mount --bind {b}/run /run
/usr/lib/courier/courier-authlib/authdaemond &
export IMAP_CAPABILITY="{CAPABILITY}"
export IMAP_CAPABILITY_TLS="$IMAP_CAPABILITY AUTH=PLAIN"
export IMAP_TLS_REQUIRED=0 COURIERTLS=/usr/bin/couriertls TLS_CERTFILE=/etc/courier/imapd.pem
export TLS_VERIFYPEER=NONE TLS_CACHEFILE={b}/tlscache TLS_CACHESIZE=524288
export IMAP_KEYWORDS=1 IMAP_ACL=1 IMAP_USELOCKS=1 IMAP_ENHANCEDIDLE=1 IMAP_IDLE_TIMEOUT=60
export IMAP_TRASHFOLDERNAME=Trash IMAP_EMPTYTRASH= IMAP_MOVE_EXPUNGE_TO_TRASH=0
export IMAP_MAILBOX_SANITY_CHECK=1 MAILDIRPATH=Maildir
IMAP_STARTTLS=YES {tcpd} -stderr={b}/imapd.err {self.port} {login} &
IMAP_STARTTLS=NO IMAP_TLS=1 {tcpd} -stderr={b}/imapd-ssl.err {self.ssl_port} \\
    /usr/bin/couriertls -server -tcpd {login} &
wait
""")

    def _write_userdb(self):
        env = dict(os.environ, **self.env)
        u = self.mail_user
        plain, shadow = [], []
        for name, password in sorted(self.users.items()):
            home = os.path.join(self.mail_dir, name)
            plain.append(f"{name}\tuid={u.uid}|gid={u.gid}|home={home}|mail={home}/Maildir\n")
            digest = base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest())
            shadow.append(f"{name}\tsystempw={{SHA256}}{digest.decode('ascii')}\n")
        for name, lines in (("userdb", plain), ("userdbshadow", shadow)):
            subprocess.run(
                [self._path(MAKEDAT), "-", os.path.join(self.state, name + ".tmp"),
                 os.path.join(self.state, name + ".dat")],
                input=("".join(lines) + ".\n").encode("utf-8"),
                env=env, check=True, capture_output=True,
            )

    def _make_maildir(self, name):
        home = os.path.join(self.mail_dir, name)
        maildir = os.path.join(home, "Maildir")
        if not os.path.isdir(maildir):
            os.makedirs(home, exist_ok=True)
            subprocess.run([self._path(MAILDIRMAKE), maildir], env=dict(os.environ, **self.env),
                           check=True, capture_output=True)
        self._chown_tree(home)

    def _register(self, users):
        self._write_userdb()
        for name in users:
            self._make_maildir(name)

    def start(self, timeout=20.0):
        if self.process is not None:
            raise RuntimeError("already started")
        self._spawn(["unshare", "--mount", "--propagation", "private",
                     "sh", os.path.join(self.base_dir, "launch.sh")], timeout=timeout)
        return self
