"""``fido``: the operator's command (also ``python -m fido_tx``).

Subcommands: ``init``, ``keygen``, ``encrypt``, ``decrypt`` (here), and
``check``, ``status``, ``demo``, ``import-mailroom`` (in :mod:`fido_tx.cmd.check`,
:mod:`fido_tx.cmd.status`, :mod:`fido_tx.demo.run` and
:mod:`fido_tx.cmd.import_mailroom`, imported only when used).
Every failure is one line on stderr, ``fido: error: ...``, with exit status 1
(2 for a usage error); ``FIDO_DEBUG=1`` adds the traceback of an unexpected
error.
"""

import argparse
import importlib
import os
import sys
import traceback

from fido_tx import __version__
from fido_tx.accounts import model as accounts
from fido_tx import config

PROG = "fido"

#: subcommands implemented elsewhere: name -> (module, one-line help)
LAZY_COMMANDS = {
    "check": (
        "fido_tx.cmd.check",
        "validate the config and the accounts file",
    ),
    "status": ("fido_tx.cmd.status", "show each account's state from Redis"),
    "demo": (
        "fido_tx.demo.run",
        "run the daemon against a built-in IMAP server and a real Redis",
    ),
    "import-mailroom": (
        "fido_tx.cmd.import_mailroom",
        "convert a mail_room YAML config into fido.toml and an accounts file",
    ),
}


_COMMAND_NAMES = frozenset(["init", "keygen", "encrypt", "decrypt", *LAZY_COMMANDS])


class CliError(Exception):
    """A failure to report as one line, ``fido: error: <message>``."""


class _UsageError(Exception):
    def __init__(self, prog, message):
        super().__init__(message)
        self.prog = prog
        self.message = message


class _ParserExit(Exception):
    def __init__(self, status):
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that writes to injected streams and never exits."""

    def __init__(self, *args, out=None, err=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._out = out
        self._err = err

    def _print_message(self, message, file=None):
        if not message:
            return
        stream = self._err if file is sys.stderr else self._out
        _say(stream or file or sys.stdout, message)

    def exit(self, status=0, message=None):
        if message:
            _say(self._err or sys.stderr, message)
        raise _ParserExit(status)

    def error(self, message):
        raise _UsageError(self.prog, message)


def _say(stream, text):
    """Write text to a text or a binary stream."""
    try:
        stream.write(text)
    except TypeError:
        stream.write(text.encode("utf-8"))
    stream.flush()


def _binary(stream):
    """The byte stream under ``stream`` (``sys.stdout`` -> ``sys.stdout.buffer``)."""
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        return buffer
    return stream


def _one_line(text):
    return " ".join(str(text).split()) or "(no message)"


def _describe_os_error(e):
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return _one_line(e)


# -- parser -------------------------------------------------------------------


def build_parser(out=None, err=None, argv=()):
    """The ``fido`` argument parser.

    ``argv`` only decides which of the lazy subcommands get their
    ``add_arguments`` hook called (importing just the module needed).
    """

    def sub_parser(sub, name, **kw):
        return sub.add_parser(name, out=out, err=err, **kw)

    parser = _Parser(
        prog=PROG,
        description=(
            "Fido fetches mail from IMAP accounts into a Redis stream, exactly once. "
            "The daemon runs under twistd (twistd -n fido); this command sets it up "
            "and inspects it."
        ),
        out=out,
        err=err,
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="fido.toml to use (default: $FIDO_CONFIG, /etc/fido/fido.toml, deploy "
        "directories, ~/.config/fido/fido.toml, ~/.fido.toml)",
    )
    parser.add_argument("--version", action="version", version=f"fido {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _file_commands(sub, sub_parser)
    _lazy_commands(sub, sub_parser, argv)
    return parser


def _file_commands(sub, sub_parser):
    """``init``, ``keygen``, ``encrypt``, ``decrypt``: the commands that write files."""
    p = sub_parser(
        sub,
        "init",
        help="write a commented default fido.toml",
        description="Write the commented default configuration.  Without --path it "
        "goes to --config, else /etc/fido/fido.toml (root) or ~/.config/fido/fido.toml.",
    )
    p.add_argument("--path", metavar="P", help="where to write it")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_init)

    p = sub_parser(
        sub,
        "keygen",
        help="create a Fernet key file for the accounts file",
        description="Create a new Fernet key file (mode 0600).  With --rotate, put a "
        "new key in front of the existing ones: new encryptions use it, files "
        "encrypted with the older keys still decrypt.",
    )
    p.add_argument("path", metavar="PATH", help="key file to create")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--force", action="store_true", help="replace an existing key file (its keys are lost)"
    )
    group.add_argument(
        "--rotate", action="store_true", help="add a new key in front of an existing key file"
    )
    p.set_defaults(func=cmd_keygen)

    for name, short, verb, func in (
        (
            "encrypt",
            "encrypt a JSON accounts file",
            "Encrypt a JSON accounts file (checked first) as one Fernet token with the "
            "newest key.",
            cmd_encrypt,
        ),
        ("decrypt", "decrypt an accounts file", "Decrypt an encrypted accounts file.", cmd_decrypt),
    ):
        p = sub_parser(
            sub,
            name,
            help=short,
            description=verb + "  IN and OUT default to stdin and stdout (also \"-\"); "
            "OUT is written atomically with mode 0600.",
        )
        p.add_argument(
            "--key", metavar="KEYFILE", help="key file (default: key_file of fido.toml)"
        )
        p.add_argument("input", metavar="IN", nargs="?", default="-")
        p.add_argument("output", metavar="OUT", nargs="?", default="-")
        p.set_defaults(func=func)


def _lazy_commands(sub, sub_parser, argv):
    """The commands whose modules are imported only when used."""
    wanted = set(argv or ())
    for name, (module_name, help_text) in LAZY_COMMANDS.items():
        p = sub_parser(sub, name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        p.add_argument(
            "--config",
            metavar="PATH",
            default=argparse.SUPPRESS,
            help="fido.toml to use (same as fido --config)",
        )
        if name in wanted:
            try:
                module = importlib.import_module(module_name)
                add_arguments = getattr(module, "add_arguments", None)
                if add_arguments is not None:
                    add_arguments(p)
            except Exception:  # reported when the command runs
                pass
        p.set_defaults(func=_lazy(name, module_name))


def _lazy(name, module_name):
    def run(ctx, args):
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise CliError(f"fido {name} is not available: {_one_line(e)}") from None
        result = module.main(args)
        if result is None or result is True:
            return 0
        if result is False:
            return 1
        return int(result)

    run.__name__ = f"cmd_{name}"
    return run


# -- context --------------------------------------------------------------------


class _Context:
    def __init__(self, stdin, stdout, stderr, environ, roots):
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.environ = environ
        self.roots = roots

    def say(self, text):
        _say(self.stdout, text + "\n")

    def warn(self, text):
        _say(self.stderr, f"{PROG}: warning: {text}\n")


def main(argv=None, stdin=None, stdout=None, stderr=None, environ=None, roots=None):
    """Run the ``fido`` command; returns the exit status.

    The streams, the environment and the config :class:`~fido_tx.config.Roots`
    are injectable for tests; the defaults are the process's own.
    """
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    environ = environ if environ is not None else os.environ
    ctx = _Context(stdin, stdout, stderr, environ, roots)

    def fail(message, status=1):
        _say(stderr, f"{PROG}: error: {_one_line(message)}\n")
        return status

    try:
        parser = build_parser(stdout, stderr, argv)
        args = parser.parse_args(argv)
        if not args.command:
            return fail("a command is required (see fido --help)", 2)
        # Conveniences for the lazily imported commands.
        args.stdin, args.stdout, args.stderr = stdin, stdout, stderr
        args.environ = environ
        args.roots = roots
        return args.func(ctx, args)
    except _ParserExit as e:
        return e.status
    except _UsageError as e:
        prog = e.prog
        if prog == PROG:
            # "unrecognized arguments" comes from the top parser: point at
            # the subcommand's help when there is one.
            names = _COMMAND_NAMES & set(argv)
            command = next((a for a in argv if a in names), None)
            if command:
                prog = f"{PROG} {command}"
        return fail(f"{e.message} (see {prog} --help)", 2)
    except (CliError, config.ConfigError, accounts.AccountsFileError) as e:
        return fail(e)
    except OSError as e:
        return fail(_describe_os_error(e))
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as e:
        if environ.get("FIDO_DEBUG", "") not in ("", "0"):
            _say(stderr, traceback.format_exc())
        return fail(
            f"unexpected {type(e).__name__}: {_one_line(e)}"
            " (set FIDO_DEBUG=1 to see the traceback)"
        )


# -- commands ---------------------------------------------------------------------


def cmd_init(ctx, args):
    roots = ctx.roots or config.Roots()
    explicit = args.path or args.config
    if explicit:
        candidates = [explicit]
    else:
        candidates = roots.creation_candidates()
    failures = []
    for candidate in candidates:
        try:
            path = config.write_default(candidate, force=args.force)
        except FileExistsError:
            raise CliError(
                f"{os.path.abspath(candidate)} exists; use --force to replace it"
            ) from None
        except OSError as e:
            if explicit:
                raise
            failures.append(f"{candidate}: {e.strerror or e}")
            continue
        ctx.say(f"wrote {path}")
        ctx.say(f"next: edit it, then run: fido --config {path} check")
        return 0
    raise CliError("cannot write a config file (" + "; ".join(failures) + ")")


def cmd_keygen(ctx, args):
    path = os.path.abspath(args.path)
    key = accounts.generate_key() + b"\n"
    if args.rotate:
        if not os.path.exists(path):
            raise CliError(f"{path} does not exist; --rotate adds a key to an existing key file")
        old = accounts.read_keys(path)
        with open(path, "rb") as f:
            previous = f.read()
        if previous and not previous.endswith(b"\n"):
            previous += b"\n"
        config.atomic_write(path, key + previous, 0o600)
        ctx.say(
            f"added a new key in front of {len(old)} older key(s) in {path};"
            " re-encrypt the accounts file, then remove the old keys"
        )
        return 0
    if args.force:
        config.atomic_write(path, key, 0o600)
    else:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise CliError(
                f"{path} exists; use --rotate to add a key to it, or --force to replace it"
            ) from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(key)
        except BaseException:
            config._unlink_quietly(path)
            raise
    ctx.say(f"wrote a new key to {path} (mode 0600)")
    return 0


def _key_file(ctx, args):
    if args.key:
        return os.path.abspath(args.key)
    path = config.find_config(args.config, ctx.environ, ctx.roots or config.Roots())
    if path is None:
        raise CliError("no --key given and no fido.toml found; pass --key KEYFILE")
    settings = config.read_settings(path)
    if not settings.fido.key_file:
        raise CliError(f'{path} sets key_file = "" (plain JSON); pass --key KEYFILE')
    return settings.fido.key_file


def _read_input(ctx, name):
    if name in (None, "-"):
        return _binary(ctx.stdin).read(), "<stdin>"
    with open(name, "rb") as f:
        return f.read(), os.path.abspath(name)


def _write_output(ctx, name, data):
    if name in (None, "-"):
        stream = _binary(ctx.stdout)
        stream.write(data)
        stream.flush()
        return
    config.atomic_write(name, data, 0o600)


def _check_key_permissions(ctx, key_file):
    if accounts.insecure_permissions(key_file):
        ctx.warn(f"{key_file} is readable by group or others; chmod 600 it")


def cmd_encrypt(ctx, args):
    key_file = _key_file(ctx, args)
    data, source = _read_input(ctx, args.input)
    # Refuse anything the daemon could not load (bad JSON, wrong shape,
    # duplicate ids); entries with problems are only warned about.
    result = accounts.parse_accounts(data, source, key_file="")
    for problem in result.problems:
        ctx.warn(f"{source}: {problem} (this account will be skipped)")
    token = accounts.encrypt_bytes(data, key_file)
    _check_key_permissions(ctx, key_file)
    _write_output(ctx, args.output, token)
    if args.output not in (None, "-"):
        _say(
            ctx.stderr,
            f"encrypted {len(result.accounts)} account(s) to {os.path.abspath(args.output)}\n",
        )
    return 0


def cmd_decrypt(ctx, args):
    key_file = _key_file(ctx, args)
    data, source = _read_input(ctx, args.input)
    plain = accounts.decrypt_bytes(data, key_file, source)
    _check_key_permissions(ctx, key_file)
    _write_output(ctx, args.output, plain)
    return 0
