"""A small in-memory IMAP server on Twisted's ``IMAP4Server``.

``fido demo`` fetches from it, so that the whole daemon can be shown on a
machine with no mail server.  It is a real IMAP4rev1 server over TCP: LOGIN,
SELECT/EXAMINE, UID SEARCH, UID FETCH (``BODY[]`` byte for byte), UID STORE,
EXPUNGE and UID COPY, with per-message flags so that what Fido marked can be
shown afterwards.
"""

import itertools
from email.parser import BytesHeaderParser

from twisted.cred import checkers, portal
from twisted.internet import protocol
from twisted.mail import imap4
from twisted.mail.interfaces import ICloseableMailboxIMAP, IMailboxIMAP, IMessageIMAP
from zope.interface import implementer

_uidvalidity = itertools.count(1700000000)


@implementer(IMessageIMAP, imap4.IMessageFile)
class MemoryMessage:
    def __init__(self, raw, uid, flags=(), date="Mon, 02 Nov 2026 10:00:00 +0000"):
        self.raw = raw
        self.uid = uid
        self.flags = set(flags)
        self.date = date

    def open(self):
        from io import BytesIO

        return BytesIO(self.raw)

    def _split(self):
        head, sep, body = self.raw.partition(b"\r\n\r\n")
        if not sep:
            head, sep, body = self.raw.partition(b"\n\n")
        return head, body

    def getHeaders(self, negate, *names):
        parsed = BytesHeaderParser().parsebytes(self._split()[0] + b"\r\n\r\n")
        wanted = {n.lower() if isinstance(n, str) else n.decode().lower() for n in names}
        out = {}
        for key, value in parsed.items():
            if not names or ((key.lower() in wanted) != negate):
                out[key.lower()] = str(value)
        return out

    def getBodyFile(self):
        from io import BytesIO

        return BytesIO(self._split()[1])

    def getSize(self):
        return len(self.raw)

    def isMultipart(self):
        return False

    def getSubPart(self, part):
        raise IndexError(part)

    def getUID(self):
        return self.uid

    def getFlags(self):
        return sorted(self.flags)

    def getInternalDate(self):
        return self.date


DEFAULT_FLAGS = (r"\Seen", r"\Answered", r"\Flagged", r"\Deleted", r"\Draft", r"\*")


@implementer(IMailboxIMAP, ICloseableMailboxIMAP, imap4.ISearchableMailbox,
             imap4.IMessageCopier)
class MemoryMailbox:
    """One folder: messages in UID order, flags per message.

    ``flags`` are the FLAGS and PERMANENTFLAGS the server announces (``\\*``
    allows keywords); ``uidvalidity`` defaults to a fresh value per folder.
    """

    def __init__(self, messages=(), flags=DEFAULT_FLAGS, uidvalidity=None):
        self.uidvalidity = uidvalidity if uidvalidity is not None else next(_uidvalidity)
        self.flags = tuple(flags)
        self.next_uid = 1
        self.messages = []
        self.listeners = []
        self.writeable = True
        for raw in messages:
            self.add(raw)

    def add(self, raw, flags=()):
        """Append a message; returns its UID."""
        self.messages.append(MemoryMessage(raw, self.next_uid, flags))
        self.next_uid += 1
        return self.next_uid - 1

    def by_uid(self, uid):
        return next(m for m in self.messages if m.uid == uid)

    def uids(self):
        return [m.uid for m in self.messages]

    # IMailboxIMAPInfo / IMailboxIMAP
    def getFlags(self):
        return list(self.flags)

    def getHierarchicalDelimiter(self):
        return "/"

    def getUIDValidity(self):
        return self.uidvalidity

    def getUIDNext(self):
        return self.next_uid

    def getUID(self, message):
        return self.messages[message - 1].uid

    def getMessageCount(self):
        return len(self.messages)

    def getRecentCount(self):
        return 0

    def getUnseenCount(self):
        return sum(1 for m in self.messages if r"\Seen" not in m.flags)

    def isWriteable(self):
        return self.writeable

    def destroy(self):
        pass

    def requestStatus(self, names):
        return imap4.statusRequestHelper(self, names)

    def addListener(self, listener):
        self.listeners.append(listener)

    def removeListener(self, listener):
        self.listeners.remove(listener)

    def addMessage(self, message, flags=(), date=None):
        return self.add(message.read(), flags)

    def copy(self, message):
        return self.add(message.raw, message.flags)

    def expunge(self):
        """Sequence numbers of the removed messages, highest first (as
        EXPUNGE responses must be sent)."""
        gone = [i for i, m in enumerate(self.messages, 1) if r"\Deleted" in m.flags]
        self.messages = [m for m in self.messages if r"\Deleted" not in m.flags]
        return list(reversed(gone))

    def close(self):
        pass

    def _select(self, messages, uid):
        if uid:
            try:
                messages.last = self.next_uid - 1 or 1
            except ValueError:
                pass
            return [(i, m) for i, m in enumerate(self.messages, 1) if m.uid in messages]
        try:
            messages.last = len(self.messages) or 1
        except ValueError:
            pass
        return [(i, m) for i, m in enumerate(self.messages, 1) if i in messages]

    def fetch(self, messages, uid):
        return self._select(messages, uid)

    def store(self, messages, flags, mode, uid):
        result = {}
        for seq, m in self._select(messages, uid):
            if mode == 1:
                m.flags.update(flags)
            elif mode == -1:
                m.flags.difference_update(flags)
            else:
                m.flags = set(flags)
            result[seq] = m.getFlags()
        return result

    def search(self, query, uid):
        """UNSEEN, UNKEYWORD k and ALL: what a fetcher asks.  Returns sequence
        numbers; the server turns them into UIDs for UID SEARCH."""
        terms = [t.upper() if isinstance(t, bytes) else t for t in query]
        out = []
        for seq, m in enumerate(self.messages, 1):
            ok, i = True, 0
            while i < len(terms):
                t = terms[i]
                if t == b"UNSEEN":
                    ok = ok and r"\Seen" not in m.flags
                elif t == b"UNKEYWORD":
                    i += 1
                    ok = ok and query[i].decode() not in m.flags
                elif t != b"ALL":
                    raise imap4.IllegalQueryError(t)
                i += 1
            if ok:
                out.append(seq)
        return out


class _Account(imap4.MemoryAccount):
    def _emptyMailbox(self, name, id):
        return MemoryMailbox()


@implementer(portal.IRealm)
class _Realm:
    def __init__(self, accounts):
        self.accounts = accounts

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if imap4.IAccount not in interfaces:
            raise NotImplementedError()
        name = avatar_id.decode() if isinstance(avatar_id, bytes) else avatar_id
        return imap4.IAccount, self.accounts[name], lambda: None


class MemoryIMAPFactory(protocol.Factory):
    """An IMAP server factory for users with in-memory folders.

    ``users`` maps a user name to ``(password, {"INBOX": [raw, ...], ...})``.
    ``self.folders[user][name]`` is the :class:`MemoryMailbox` to inspect.
    """

    def __init__(self, users):
        self.folders = {}
        accounts = {}
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse()
        for user, (password, folders) in users.items():
            account = _Account(user)
            self.folders[user] = {}
            for name, messages in folders.items():
                box = MemoryMailbox(messages)
                account.addMailbox(name, box)
                self.folders[user][name] = box
            accounts[user] = account
            checker.addUser(user.encode(), password.encode())
        self.portal = portal.Portal(_Realm(accounts), [checker])

    def buildProtocol(self, addr):
        p = imap4.IMAP4Server()
        p.portal = self.portal
        p.factory = self
        return p
