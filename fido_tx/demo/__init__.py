"""``fido demo`` and what only it needs: an in-memory IMAP server and a Redis launcher."""
