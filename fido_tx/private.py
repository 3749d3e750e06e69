"""Every private API of a dependency that Fido uses, in one place.

Each trick here reaches behind a library's public surface because no public
API does the job (each says why).  ``tests/test_private.py`` has one test per
trick that fails loudly, naming the trick, when an upgrade removes it: read
that failure before anything else after upgrading Twisted, pyOpenSSL or
txredisapi.
"""


# -- txredisapi: write a command's pieces without joining them ------------------
#
# ``BaseRedisProtocol.execute_command`` writes what the private
# ``_build_command(*args)`` returns.  Its own encoder cost 40% of a store's
# CPU time (450 arguments per batch), and a batch's command carries every
# message body: joining it made one more copy of up to max_inflight_bytes.
# No public hook exists, so Fido overrides ``_build_command``: it hands the
# RESP pieces to ``transport.writeSequence`` and returns b"" (txredisapi then
# writes nothing: ``write(b"")`` is a no-op).  Pipelining (unused by Fido)
# keeps the joined bytes.  Checked by tests/test_private.py
# (``test_txredisapi_build_command``).

TXREDISAPI_BUILD_COMMAND = "_build_command"


def _encode_redis_arg(arg):
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, int):
        return b"%d" % arg
    raise TypeError(f"cannot send {type(arg).__name__} to Redis")


def redis_command_pieces(args):
    """RESP for one command, as a list of pieces (the arguments themselves
    are not copied)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = _encode_redis_arg(arg)
        out.append(b"$%d\r\n" % len(arg))
        out.append(arg)
        out.append(b"\r\n")
    return out


def redis_build_command(*args, **kwargs):
    """RESP for one command: the bytes txredisapi's ``_build_command`` makes."""
    return b"".join(redis_command_pieces(args))


def piecewise_redis_protocol(base):
    """A subclass of the txredisapi protocol class ``base`` whose commands
    go to the transport as pieces (see above)."""
    if not callable(getattr(base, TXREDISAPI_BUILD_COMMAND, None)):
        raise ImportError(
            f"private API gone: txredisapi {base.__name__}.{TXREDISAPI_BUILD_COMMAND} "
            "(fido_tx.private.piecewise_redis_protocol); see tests/test_private.py"
        )

    class PiecewiseRedisProtocol(base):
        def _build_command(self, *args, **kwargs):
            if self.pipelining or self.transport is None:
                return redis_build_command(*args)
            self.transport.writeSequence(redis_command_pieces(args))
            return b""

    return PiecewiseRedisProtocol
