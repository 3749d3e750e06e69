"""``fido import-mailroom FILE``: a mail_room YAML in, an equivalent
``fido.toml`` and accounts file out (encrypted with ``--key``), and one line
per key saying whether it was mapped, ignored (and why) or could not be
mapped.

Exit status: 0 when everything was mapped or knowingly ignored; 1 when the
file is broken (one line naming the key, nothing written) or when some key
could not be mapped (the files are written; edit them before running Fido).
"""

import json
import os

from fido_tx import config, mailroom
from fido_tx.accounts import model as accounts
from fido_tx.cmd.cli import CliError


def add_arguments(parser):
    parser.add_argument("file", metavar="FILE", help="mail_room YAML (rendered: no ERB tags)")
    parser.add_argument("--out-config", metavar="PATH", default="fido.toml",
                        help="fido.toml to write (default: ./fido.toml)")
    parser.add_argument("--out-accounts", metavar="PATH", default=None,
                        help="accounts file to write (default: accounts.json, or"
                        " accounts.json.enc with --key, beside the config)")
    parser.add_argument("--key", metavar="KEYFILE", default=None,
                        help="encrypt the accounts file with this key file (fido keygen)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def main(args):
    out = args.stdout

    def say(text):
        out.write(text + "\n")
        out.flush()

    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CliError(f"{args.file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{args.file}: not UTF-8 text") from None
    try:
        conversion = mailroom.convert(mailroom.load_yaml(text, args.file), args.file)
    except mailroom.MailRoomError as e:
        raise CliError(str(e)) from None

    config_path, accounts_path, key_path = _paths(args)
    base = os.path.dirname(config_path)
    check = accounts.parse_document(json.loads(mailroom.accounts_json(conversion)), "import", base)
    for problem in check.problems:
        conversion.lines.append(mailroom.Line(args.file, "mailboxes", mailroom.UNMAPPED, str(problem)))
    for line in conversion.lines:
        say(str(line))

    secret_paths = {os.path.join(base, name): value for name, value in conversion.secret_files.items()}
    targets = [config_path, accounts_path, *secret_paths]
    if not args.force:
        for path in targets:
            if os.path.exists(path):
                raise CliError(f"{path} exists: move it away or pass --force")
    data = mailroom.accounts_json(conversion).encode("utf-8")
    if key_path:
        data = accounts.encrypt_bytes(data, key_path)
    config.atomic_write(accounts_path, data, mode=0o600)
    for path, value in secret_paths.items():
        config.atomic_write(path, (value + "\n").encode("utf-8"), mode=0o600)
    toml = fido_toml(conversion, args.file, os.path.relpath(accounts_path, base),
                     os.path.relpath(key_path, base) if key_path else "")
    # mode 0600: a redis_url may carry a password
    config.atomic_write(config_path, toml.encode("utf-8"), mode=0o600)
    n, d = len(conversion.accounts), len(conversion.deliveries)
    say(f"wrote {config_path} ({d} deliveries) and {accounts_path} ({n} accounts"
        + (", encrypted" if key_path else "") + ")")
    say(f"next: fido check --config {config_path}")
    if conversion.unmapped:
        say(f"{len(conversion.unmapped)} keys could not be mapped: edit the files before running Fido")
        return 1
    return 0


def _paths(args):
    """The absolute output paths and key file, checked before any write."""
    config_path = os.path.abspath(args.out_config)
    base = os.path.dirname(config_path)
    default_accounts = "accounts.json.enc" if args.key else "accounts.json"
    accounts_path = os.path.abspath(args.out_accounts or os.path.join(base, default_accounts))
    key_path = os.path.abspath(args.key) if args.key else ""
    for path in (config_path, accounts_path):
        if not os.path.isdir(os.path.dirname(path)):
            raise CliError(f"{os.path.dirname(path)}: no such directory (for {path})")
    if key_path:
        try:
            accounts.read_keys(key_path)
        except accounts.AccountsFileError as e:
            raise CliError(str(e)) from None
    return config_path, accounts_path, key_path


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def _toml_key(key):
    return key if key.replace("-", "").replace("_", "").isalnum() else json.dumps(key)


def fido_toml(conversion, source, accounts_file, key_file):
    """The text of the fido.toml for ``conversion``."""
    lines = [
        f"# Written by fido import-mailroom from {os.path.basename(source)}.",
        "# Every other key has its default: see README.rst (Configuration).",
        "",
        "[fido]",
        f"accounts_file = {_toml_value(accounts_file)}",
        f"key_file = {_toml_value(key_file)}",
    ]
    if conversion.redis_url:
        lines += ["", "[redis]", f"url = {_toml_value(conversion.redis_url)}"]
    for name, table in conversion.deliveries.items():
        lines += ["", f"[delivery.{_toml_key(name)}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
