"""The ``fido`` command: init, keygen, encrypt/decrypt, errors and exit codes."""

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import types

from cryptography.fernet import Fernet
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.accounts import model as accounts
from fido_tx.cmd import cli
from fido_tx import config

PASSWORD = "cli-secret-password"
DOCUMENT = {
    "accounts": [
        {"id": "a1", "host": "imap.example.com", "username": "u", "password": PASSWORD}
    ]
}


class _Run:
    """The result of one ``cli.main`` call with captured streams."""

    def __init__(self, status, stdout, stderr):
        self.status = status
        self.stdout = stdout
        self.stderr = stderr


class _CliMixin:
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="fido-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.roots = config.Roots(
            etc=os.path.join(self.dir, "etc"),
            deploy_globs=(),
            home=os.path.join(self.dir, "home"),
            is_root=False,
        )

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def fido(self, *argv, stdin=b"", environ=None):
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        err = io.StringIO()
        status = cli.main(
            list(argv),
            stdin=io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"),
            stdout=out,
            stderr=err,
            environ=environ if environ is not None else {},
            roots=self.roots,
        )
        out.flush()
        return _Run(status, out.buffer.getvalue(), err.getvalue())

    def assertOneLineError(self, run, status=1):
        self.assertEqual(run.status, status, run.stderr)
        lines = run.stderr.splitlines()
        self.assertEqual(len(lines), 1, run.stderr)
        self.assertTrue(lines[0].startswith("fido: error: "), run.stderr)
        self.assertNotIn("Traceback", run.stderr)
        return lines[0]

    def write(self, name, data, mode=0o600):
        path = self.path(name)
        with open(path, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
        os.chmod(path, mode)
        return path

    def keygen(self, name="fido.key"):
        run = self.fido("keygen", self.path(name))
        self.assertEqual(run.status, 0, run.stderr)
        return self.path(name)


class HelpTests(_CliMixin, SynchronousTestCase):
    def test_every_command_has_help(self):
        for command in ("init", "keygen", "encrypt", "decrypt", "check", "status", "demo"):
            run = self.fido(command, "--help")
            self.assertEqual(run.status, 0, command)
            self.assertIn(f"usage: fido {command}", run.stdout.decode())

    def test_top_level_help_lists_commands(self):
        run = self.fido("--help")
        self.assertEqual(run.status, 0)
        for command in ("init", "keygen", "encrypt", "decrypt", "check", "status", "demo"):
            self.assertIn(command, run.stdout.decode())

    def test_no_command_is_a_usage_error(self):
        line = self.assertOneLineError(self.fido(), status=2)
        self.assertIn("a command is required", line)

    def test_unknown_option_is_a_usage_error(self):
        line = self.assertOneLineError(self.fido("keygen", "--bogus", "x"), status=2)
        self.assertIn("--bogus", line)
        self.assertIn("fido keygen --help", line)

    def test_version(self):
        run = self.fido("--version")
        self.assertEqual(run.status, 0)
        self.assertIn("fido ", run.stdout.decode())


class InitTests(_CliMixin, SynchronousTestCase):
    def test_init_writes_default_to_home_config_for_non_root(self):
        run = self.fido("init")
        self.assertEqual(run.status, 0, run.stderr)
        path = os.path.join(self.roots.home, ".config", "fido", "fido.toml")
        self.assertIn(f"wrote {path}", run.stdout.decode())
        with open(path) as f:
            self.assertEqual(f.read(), config.default_text())

    def test_init_as_root_writes_to_etc(self):
        self.roots = config.Roots(
            etc=self.path("etc"), deploy_globs=(), home=self.path("home"), is_root=True
        )
        self.assertEqual(self.fido("init").status, 0)
        self.assertTrue(os.path.exists(self.path("etc", "fido.toml")))

    def test_init_path_and_refusal_and_force(self):
        target = self.write("mine.toml", "# keep me\n", mode=0o644)
        line = self.assertOneLineError(self.fido("init", "--path", target))
        self.assertIn("exists; use --force", line)
        with open(target) as f:
            self.assertEqual(f.read(), "# keep me\n")
        self.assertEqual(self.fido("init", "--path", target, "--force").status, 0)
        with open(target) as f:
            self.assertEqual(f.read(), config.default_text())

    def test_init_uses_global_config_option(self):
        target = self.path("sub", "fido.toml")
        self.assertEqual(self.fido("--config", target, "init").status, 0)
        self.assertTrue(os.path.exists(target))

    def test_init_into_unwritable_place_is_one_line(self):
        self.write("blocker", "")
        line = self.assertOneLineError(self.fido("init", "--path", self.path("blocker", "x.toml")))
        self.assertIn("blocker", line)


class KeygenTests(_CliMixin, SynchronousTestCase):
    def test_key_file_mode_0600_and_valid(self):
        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        path = self.keygen()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        (key,) = accounts.read_keys(path)
        Fernet(key)

    def test_refuses_to_overwrite(self):
        path = self.keygen()
        with open(path, "rb") as f:
            before = f.read()
        line = self.assertOneLineError(self.fido("keygen", path))
        self.assertIn("exists", line)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_force_replaces(self):
        path = self.keygen()
        (old,) = accounts.read_keys(path)
        self.assertEqual(self.fido("keygen", path, "--force").status, 0)
        (new,) = accounts.read_keys(path)
        self.assertNotEqual(old, new)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_rotate_puts_a_new_key_first_and_keeps_the_old(self):
        path = self.keygen()
        (old,) = accounts.read_keys(path)
        self.assertEqual(self.fido("keygen", path, "--rotate").status, 0)
        new, kept = accounts.read_keys(path)
        self.assertEqual(kept, old)
        self.assertNotEqual(new, old)

    def test_rotate_needs_an_existing_file(self):
        self.assertOneLineError(self.fido("keygen", self.path("none.key"), "--rotate"))

    def test_key_never_printed(self):
        run = self.fido("keygen", self.path("k"))
        (key,) = accounts.read_keys(self.path("k"))
        self.assertNotIn(key.decode(), run.stdout.decode() + run.stderr)

    def test_missing_directory_is_one_line(self):
        line = self.assertOneLineError(self.fido("keygen", self.path("no", "dir", "k")))
        self.assertIn("No such file or directory", line)


class CryptTests(_CliMixin, SynchronousTestCase):
    def test_roundtrip_files(self):
        key = self.keygen()
        plain = json.dumps(DOCUMENT).encode()
        src = self.write("accounts.json", plain, mode=0o644)
        enc, dec = self.path("accounts.json.enc"), self.path("back.json")
        run = self.fido("encrypt", "--key", key, src, enc)
        self.assertEqual(run.status, 0, run.stderr)
        self.assertEqual(stat.S_IMODE(os.stat(enc).st_mode), 0o600)
        with open(enc, "rb") as f:
            token = f.read()
        self.assertNotIn(PASSWORD.encode(), token)
        # the daemon's loader reads it
        self.assertEqual([a.id for a in accounts.load_accounts(enc, key).accounts], ["a1"])
        self.assertEqual(self.fido("decrypt", "--key", key, enc, dec).status, 0)
        with open(dec, "rb") as f:
            self.assertEqual(f.read(), plain)
        self.assertEqual(stat.S_IMODE(os.stat(dec).st_mode), 0o600)

    def test_roundtrip_stdin_stdout(self):
        key = self.keygen()
        plain = json.dumps(DOCUMENT).encode()
        run = self.fido("encrypt", "--key", key, stdin=plain)
        self.assertEqual(run.status, 0, run.stderr)
        self.assertTrue(run.stdout.startswith(b"gAAAAA"))
        back = self.fido("decrypt", "--key", key, "-", "-", stdin=run.stdout)
        self.assertEqual(back.status, 0, back.stderr)
        self.assertEqual(back.stdout, plain)

    def test_key_defaults_to_the_configs_key_file(self):
        key = self.keygen("conf-key")
        conf = self.write("fido.toml", '[fido]\nkey_file = "conf-key"\n')
        plain = json.dumps(DOCUMENT).encode()
        run = self.fido("--config", conf, "encrypt", stdin=plain)
        self.assertEqual(run.status, 0, run.stderr)
        self.assertEqual(accounts.decrypt_bytes(run.stdout, key), plain)
        # and via $FIDO_CONFIG
        run = self.fido("decrypt", stdin=run.stdout, environ={"FIDO_CONFIG": conf})
        self.assertEqual(run.stdout, plain)

    def test_no_key_and_no_config(self):
        line = self.assertOneLineError(self.fido("encrypt", stdin=b"{}"))
        self.assertIn("--key", line)

    def test_plain_config_needs_key(self):
        conf = self.write("fido.toml", '[fido]\nkey_file = ""\n')
        line = self.assertOneLineError(self.fido("--config", conf, "encrypt", stdin=b"{}"))
        self.assertIn('key_file = ""', line)

    def test_encrypt_refuses_invalid_json(self):
        key = self.keygen()
        out = self.path("out.enc")
        line = self.assertOneLineError(
            self.fido("encrypt", "--key", key, "-", out, stdin=b'{"accounts": [')
        )
        self.assertIn("invalid JSON at line 1", line)
        self.assertFalse(os.path.exists(out))

    def test_encrypt_refuses_wrong_shape_and_duplicates(self):
        key = self.keygen()
        self.assertIn(
            'expected {"accounts"',
            self.assertOneLineError(self.fido("encrypt", "--key", key, stdin=b"[]")),
        )
        dup = {"accounts": [DOCUMENT["accounts"][0]] * 2}
        self.assertIn(
            "duplicate account id 'a1'",
            self.assertOneLineError(
                self.fido("encrypt", "--key", key, stdin=json.dumps(dup).encode())
            ),
        )

    def test_encrypt_warns_about_bad_entries_without_passwords(self):
        key = self.keygen()
        bad = {"accounts": DOCUMENT["accounts"] + [{"id": "b2", "password": PASSWORD}]}
        run = self.fido("encrypt", "--key", key, stdin=json.dumps(bad).encode())
        self.assertEqual(run.status, 0, run.stderr)
        self.assertIn("warning", run.stderr)
        self.assertIn("account b2: host: missing", run.stderr)
        self.assertNotIn(PASSWORD, run.stderr)

    def test_decrypt_with_wrong_key(self):
        key = self.keygen()
        other = self.keygen("other.key")
        token = accounts.encrypt_bytes(b'{"accounts": []}', other)
        line = self.assertOneLineError(self.fido("decrypt", "--key", key, stdin=token))
        self.assertIn("cannot decrypt", line)
        self.assertIn("wrong key", line)

    def test_missing_input_file(self):
        key = self.keygen()
        line = self.assertOneLineError(self.fido("decrypt", "--key", key, self.path("nope")))
        self.assertIn("nope: No such file or directory", line)

    def test_missing_key_file(self):
        line = self.assertOneLineError(
            self.fido("encrypt", "--key", self.path("none.key"), stdin=b'{"accounts": []}')
        )
        self.assertIn("none.key", line)

    def test_insecure_key_file_warns(self):
        key = self.keygen()
        os.chmod(key, 0o644)
        run = self.fido("encrypt", "--key", key, stdin=b'{"accounts": []}')
        self.assertEqual(run.status, 0)
        self.assertIn("readable by group or others", run.stderr)

    def test_bad_config_is_one_line(self):
        conf = self.write("fido.toml", "[fido]\nwokers = 3\n")
        line = self.assertOneLineError(self.fido("--config", conf, "encrypt", stdin=b"{}"))
        self.assertIn("unknown key [fido] wokers", line)


class LazyCommandTests(_CliMixin, SynchronousTestCase):
    def fake_module(self, name, main, add_arguments=None):
        module = types.ModuleType(name)
        module.main = main
        if add_arguments is not None:
            module.add_arguments = add_arguments
        previous = sys.modules.get(name)
        sys.modules[name] = module

        def restore():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous

        self.addCleanup(restore)

    def test_dispatch_with_config_and_own_arguments(self):
        seen = []

        def add_arguments(parser):
            parser.add_argument("--json", action="store_true")

        def main(args):
            seen.append((args.config, args.json))
            return 3

        self.fake_module("fido_tx.cmd.status", main, add_arguments)
        self.assertEqual(self.fido("status", "--config", "/x.toml", "--json").status, 3)
        self.assertEqual(self.fido("--config", "/y.toml", "status").status, 3)
        self.assertEqual(self.fido("status").status, 3)
        self.assertEqual(seen, [("/x.toml", True), ("/y.toml", False), (None, False)])

    def test_module_errors_are_one_line(self):
        def main(args):
            raise config.ConfigError("/etc/fido/fido.toml: unknown key [fido] wokers")

        self.fake_module("fido_tx.cmd.check", main)
        line = self.assertOneLineError(self.fido("check"))
        self.assertEqual(line, "fido: error: /etc/fido/fido.toml: unknown key [fido] wokers")

    def test_unexpected_exception_is_one_line_unless_debug(self):
        def main(args):
            raise ZeroDivisionError("boom")

        self.fake_module("fido_tx.cmd.check", main)
        line = self.assertOneLineError(self.fido("check"))
        self.assertIn("unexpected ZeroDivisionError: boom", line)
        run = self.fido("check", environ={"FIDO_DEBUG": "1"})
        self.assertEqual(run.status, 1)
        self.assertIn("Traceback", run.stderr)

    def test_missing_module_is_one_line(self):
        self.fake_module("fido_tx.cmd.check", None)
        sys.modules["fido_tx.cmd.check"] = None  # makes the import fail
        line = self.assertOneLineError(self.fido("check"))
        self.assertIn("fido check is not available", line)


class SubprocessSmokeTests(_CliMixin, SynchronousTestCase):
    def test_python_m_fido_tx(self):
        key = self.path("smoke.key")
        env = dict(os.environ, HOME=self.dir)
        env.pop("FIDO_CONFIG", None)
        done = subprocess.run(
            [sys.executable, "-m", "fido_tx", "keygen", key],
            capture_output=True, env=env, timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        done = subprocess.run(
            [sys.executable, "-m", "fido_tx", "encrypt", "--key", key],
            input=json.dumps(DOCUMENT).encode(), capture_output=True, env=env, timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        done = subprocess.run(
            [sys.executable, "-m", "fido_tx", "decrypt", "--key", key],
            input=done.stdout, capture_output=True, env=env, timeout=60,
        )
        self.assertEqual(json.loads(done.stdout), DOCUMENT)
        done = subprocess.run(
            [sys.executable, "-m", "fido_tx", "decrypt", "--key", key, "/nonexistent"],
            capture_output=True, env=env, timeout=60,
        )
        self.assertEqual(done.returncode, 1)
        self.assertEqual(
            done.stderr.decode(), "fido: error: /nonexistent: No such file or directory\n"
        )


class OutputErrorTests(_CliMixin, SynchronousTestCase):
    def test_output_into_missing_directory_names_the_output(self):
        key = self.keygen()
        out = self.path("missing", "accounts.json.enc")
        line = self.assertOneLineError(
            self.fido("encrypt", "--key", key, "-", out, stdin=b'{"accounts": []}')
        )
        self.assertEqual(line, f"fido: error: {out}: No such file or directory")
