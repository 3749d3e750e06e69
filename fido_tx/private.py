"""Every private API of a dependency that Fido uses, in one place.

Each trick here reaches behind a library's public surface because no public
API does the job (each says why).  ``tests/test_private.py`` has one test per
trick that fails loudly, naming the trick, when an upgrade removes it: read
that failure before anything else after upgrading Twisted, pyOpenSSL or
txredisapi.
"""
