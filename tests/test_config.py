"""fido.toml: discovery order, the default file, parsing and validation."""

import os
import tempfile
import tomllib

import attr
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import config
from fido_tx.config import ConfigError, Roots, Settings, load_settings


class _TmpDirMixin:
    def make_roots(self, is_root=False):
        self.base = tempfile.mkdtemp(prefix="fido-config-")
        self.addCleanup(_rmtree, self.base)
        return Roots(
            etc=os.path.join(self.base, "etc", "fido"),
            deploy_globs=(
                os.path.join(self.base, "srv", "*", "current", "config", "fido.toml"),
                os.path.join(self.base, "var", "www", "*", "current", "config", "fido.toml"),
            ),
            home=os.path.join(self.base, "home"),
            is_root=is_root,
        )

    def write(self, relative, text="", base=None):
        path = os.path.join(base or self.base, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


def _rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _marked(name):
    """A config whose [redis] stream tells which file was read."""
    return f'[redis]\nstream = "{name}"\n'


class DiscoveryTests(_TmpDirMixin, SynchronousTestCase):
    def setUp(self):
        self.roots = self.make_roots()
        self.files = {
            "explicit": self.write("explicit/fido.toml", _marked("explicit")),
            "env": self.write("env/fido.toml", _marked("env")),
            "etc": self.write("etc/fido/fido.toml", _marked("etc")),
            "srv-b": self.write("srv/b/current/config/fido.toml", _marked("srv-b")),
            "srv-a": self.write("srv/a/current/config/fido.toml", _marked("srv-a")),
            "www": self.write("var/www/x/current/config/fido.toml", _marked("www")),
            "xdg": self.write("home/.config/fido/fido.toml", _marked("xdg")),
            "dot": self.write("home/.fido.toml", _marked("dot")),
        }

    def found(self, explicit=None, environ=None):
        settings, path, created = load_settings(
            explicit=explicit, environ=environ or {}, roots=self.roots
        )
        self.assertFalse(created)
        self.assertEqual(settings.path, path)
        return settings.redis.stream

    def test_order_first_hit_wins(self):
        env = {"FIDO_CONFIG": self.files["env"]}
        self.assertEqual(self.found(self.files["explicit"], env), "explicit")
        self.assertEqual(self.found(None, env), "env")
        # Remove candidates one at a time, from the front of the order.
        expected = ["etc", "srv-a", "srv-b", "www", "xdg", "dot"]
        for name in expected:
            self.assertEqual(self.found(), name)
            os.unlink(self.files[name])

    def test_deploy_directories_are_searched_in_sorted_order(self):
        os.unlink(self.files["etc"])
        self.assertEqual(self.found(), "srv-a")

    def test_explicit_path_must_exist(self):
        missing = os.path.join(self.base, "nope.toml")
        e = self.assertRaises(ConfigError, load_settings, missing, {}, self.roots)
        self.assertIn(missing, str(e))
        self.assertIn("--config", str(e))

    def test_env_path_must_exist(self):
        missing = os.path.join(self.base, "nope.toml")
        e = self.assertRaises(
            ConfigError, load_settings, None, {"FIDO_CONFIG": missing}, self.roots
        )
        self.assertIn(missing, str(e))
        self.assertIn("FIDO_CONFIG", str(e))

    def test_empty_env_variable_is_ignored(self):
        self.assertEqual(self.found(None, {"FIDO_CONFIG": ""}), "etc")


class DefaultFileTests(_TmpDirMixin, SynchronousTestCase):
    def test_non_root_writes_to_home_config(self):
        roots = self.make_roots(is_root=False)
        settings, path, created = load_settings(environ={}, roots=roots)
        self.assertTrue(created)
        self.assertEqual(path, os.path.join(roots.home, ".config", "fido", "fido.toml"))
        self.assertFalse(os.path.exists(os.path.join(roots.etc, "fido.toml")))
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), config.default_text())
        self.assertEqual(os.listdir(os.path.dirname(path)), ["fido.toml"])  # no temp left
        # The second run finds it.
        _, again, created = load_settings(environ={}, roots=roots)
        self.assertEqual((again, created), (path, False))

    def test_root_writes_to_etc(self):
        roots = self.make_roots(is_root=True)
        _, path, created = load_settings(environ={}, roots=roots)
        self.assertTrue(created)
        self.assertEqual(path, os.path.join(roots.etc, "fido.toml"))

    def test_root_falls_back_to_home_when_etc_is_not_writable(self):
        roots = self.make_roots(is_root=True)
        # A file where the directory should be: /etc/fido cannot be created.
        self.write("etc", "")
        _, path, created = load_settings(environ={}, roots=roots)
        self.assertTrue(created)
        self.assertEqual(path, os.path.join(roots.home, ".config", "fido", "fido.toml"))

    def test_nowhere_writable_is_a_config_error(self):
        roots = self.make_roots(is_root=False)
        self.write("home", "")  # home is a file: nothing below it can be made
        e = self.assertRaises(ConfigError, load_settings, None, {}, roots)
        self.assertIn("none could be created", str(e))

    def test_default_file_parses_to_the_schema_defaults(self):
        roots = self.make_roots()
        settings, path, _ = load_settings(environ={}, roots=roots)
        here = os.path.dirname(path)
        expected = attr.evolve(
            Settings(),
            fido=attr.evolve(
                Settings().fido,
                accounts_file=os.path.join(here, "accounts.json.enc"),
                key_file=os.path.join(here, "fido.key"),
            ),
            path=path,
        )
        self.assertEqual(settings, expected)

    def test_default_file_has_exactly_the_schema_keys(self):
        document = tomllib.loads(config.default_text())
        self.assertEqual(sorted(document), sorted(config.SECTIONS))
        for section, cls in config.SECTIONS.items():
            self.assertEqual(
                sorted(document[section]), sorted(f.name for f in attr.fields(cls)), section
            )

    def test_write_default_refuses_to_overwrite_without_force(self):
        self.make_roots()
        path = self.write("x/fido.toml", "# mine\n")
        self.assertRaises(FileExistsError, config.write_default, path)
        with open(path) as f:
            self.assertEqual(f.read(), "# mine\n")
        config.write_default(path, force=True)
        with open(path) as f:
            self.assertEqual(f.read(), config.default_text())
        self.assertEqual(os.listdir(os.path.dirname(path)), ["fido.toml"])


class ParseTests(_TmpDirMixin, SynchronousTestCase):
    def setUp(self):
        self.roots = self.make_roots()

    def load(self, text, name="conf/fido.toml", dry_run=None):
        path = self.write(name, text)
        settings, found, _ = load_settings(path, {}, self.roots, dry_run=dry_run)
        self.assertEqual(found, path)
        return settings

    def error(self, text, name="conf/fido.toml"):
        path = self.write(name, text)
        e = self.assertRaises(ConfigError, load_settings, path, {}, self.roots)
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(path + ": "), message)
        return message

    def test_empty_file_is_all_defaults(self):
        s = self.load("")
        self.assertEqual(s.fido.workers, 100)
        self.assertEqual(s.redis, config.RedisSettings())

    def test_values_are_read(self):
        s = self.load(
            "[fido]\nworkers = 7\npoll_interval = 2.5\nshard = \"2/3\"\n"
            "[imap]\nbatch_messages = 5\n[log]\nformat = \"json\"\nlevel = \"debug\"\n"
            "[http]\nlisten = \"\"\n"
        )
        self.assertEqual(
            (s.fido.workers, s.fido.poll_interval, s.fido.shard), (7, 2.5, "2/3")
        )
        self.assertEqual(s.imap.batch_messages, 5)
        self.assertEqual((s.log.format, s.log.level, s.http.listen), ("json", "debug", ""))

    def test_float_accepts_integer(self):
        s = self.load("[fido]\npoll_interval = 30\n")
        self.assertEqual(s.fido.poll_interval, 30.0)
        self.assertIsInstance(s.fido.poll_interval, float)

    def test_paths_are_relative_to_the_file(self):
        s = self.load(
            "[fido]\naccounts_file = \"data/accounts.json\"\nkey_file = \"../keys/fido.key\"\n"
            "state_dir = \"state\"\n[log]\nfile = \"fido.log\"\n",
            name="deploy/config/fido.toml",
        )
        here = os.path.join(self.base, "deploy", "config")
        self.assertEqual(s.fido.accounts_file, os.path.join(here, "data", "accounts.json"))
        self.assertEqual(s.fido.key_file, os.path.join(self.base, "deploy", "keys", "fido.key"))
        self.assertEqual(s.fido.state_dir, os.path.join(here, "state"))
        self.assertEqual(s.log.file, os.path.join(here, "fido.log"))
        self.assertEqual(s.path, os.path.join(here, "fido.toml"))

    def test_absolute_paths_stay_and_empty_stays_empty(self):
        s = self.load('[fido]\naccounts_file = "/data/a.json"\nkey_file = ""\n')
        self.assertEqual(s.fido.accounts_file, "/data/a.json")
        self.assertEqual(s.fido.key_file, "")
        self.assertEqual(s.fido.state_dir, "")
        self.assertEqual(s.log.file, "")

    def test_default_paths_are_relative_to_the_file_too(self):
        s = self.load("", name="somewhere/fido.toml")
        here = os.path.join(self.base, "somewhere")
        self.assertEqual(s.fido.accounts_file, os.path.join(here, "accounts.json.enc"))
        self.assertEqual(s.fido.key_file, os.path.join(here, "fido.key"))

    def test_dry_run_argument_overrides_the_file(self):
        self.assertTrue(self.load("[fido]\ndry_run = false\n", dry_run=True).fido.dry_run)
        self.assertTrue(self.load("[fido]\ndry_run = true\n", dry_run=None).fido.dry_run)
        # False (a flag that was not given) does not turn off the file's setting.
        self.assertTrue(self.load("[fido]\ndry_run = true\n", dry_run=False).fido.dry_run)
        self.assertFalse(self.load("", dry_run=False).fido.dry_run)

    def test_unknown_key_names_file_section_and_key(self):
        message = self.error("[fido]\nwokers = 3\n")
        self.assertTrue(message.endswith("unknown key [fido] wokers"), message)

    def test_unknown_section(self):
        self.assertIn("unknown section [imapp]", self.error("[imapp]\nx = 1\n"))

    def test_top_level_key(self):
        self.assertIn("unknown key workers", self.error("workers = 3\n"))

    def test_section_must_be_a_table(self):
        self.assertIn("[fido] must be a table", self.error('fido = "x"\n'))

    def test_invalid_toml(self):
        message = self.error("[fido\n")
        self.assertIn("invalid TOML", message)
        self.assertIn("line 1", message)

    def test_not_utf8(self):
        path = os.path.join(self.base, "bin.toml")
        with open(path, "wb") as f:
            f.write(b'[fido]\nshard = "\xff"\n')
        e = self.assertRaises(ConfigError, load_settings, path, {}, self.roots)
        self.assertIn("invalid TOML", str(e))

    def test_unreadable_is_a_config_error(self):
        path = os.path.join(self.base, "adir")
        os.makedirs(path)
        e = self.assertRaises(ConfigError, load_settings, path, {}, self.roots)
        self.assertIn(path, str(e))

    def test_wrong_types_name_key_expected_type_and_value(self):
        cases = [
            ('[fido]\nworkers = "ten"\n', "[fido] workers: expected an integer, got string 'ten'"),
            ("[fido]\nworkers = 1.5\n", "[fido] workers: expected an integer, got float 1.5"),
            ("[fido]\nworkers = true\n", "[fido] workers: expected an integer, got boolean True"),
            ("[fido]\ndry_run = 1\n", "[fido] dry_run: expected a boolean, got integer 1"),
            ("[fido]\npoll_interval = \"60\"\n", "[fido] poll_interval: expected a number"),
            ("[log]\nlevel = 3\n", "[log] level: expected a string, got integer 3"),
            ("[http]\nlisten = [1]\n", "[http] listen: expected a string, got array"),
        ]
        for text, expected in cases:
            self.assertIn(expected, self.error(text))

    def test_secret_values_are_not_echoed(self):
        message = self.error('[reporter]\ntoken = 12345678\n')
        self.assertIn("[reporter] token: expected a string, got integer", message)
        self.assertNotIn("12345678", message)
        message = self.error('[redis]\nurl = "http://user:s3cret@host/"\n')
        self.assertIn("[redis] url: scheme must be", message)
        self.assertNotIn("s3cret", message)

    def test_bad_values_name_key_and_reason(self):
        cases = [
            ("[fido]\nworkers = 0\n", "[fido] workers: must be at least 1, got 0"),
            ("[fido]\npoll_interval = 0\n", "[fido] poll_interval: must be greater than 0"),
            ("[fido]\npoll_interval = -1.5\n", "[fido] poll_interval: must be greater than 0"),
            ('[fido]\nshard = "3/2"\n', "[fido] shard: must be k/n with 1 <= k <= n"),
            ('[fido]\nshard = "0/2"\n', "[fido] shard: must be k/n with 1 <= k <= n"),
            ('[fido]\nshard = "half"\n', '[fido] shard: must be "k/n"'),
            ('[fido]\nwatch = "inotify"\n', '[fido] watch: must be one of "auto", "poll"'),
            ('[fido]\naccounts_file = ""\n', "[fido] accounts_file: must not be empty"),
            ("[fido]\ngrace_period = -1\n", "[fido] grace_period: must be at least 0"),
            ('[redis]\nurl = "http://x"\n', "[redis] url: scheme must be redis://, rediss://"),
            ('[redis]\nurl = "localhost:6379"\n', "[redis] url: scheme must be"),
            ('[redis]\nstream = ""\n', "[redis] stream: must not be empty"),
            ("[redis]\ncommand_timeout = 0\n", "[redis] command_timeout: must be greater than 0"),
            ("[redis]\nmax_backlog = 0\n", "[redis] max_backlog: must be at least 1"),
            ('[log]\nlevel = "verbose"\n', '[log] level: must be one of "debug", "info"'),
            ('[log]\nformat = "xml"\n', '[log] format: must be one of "text", "json"'),
            ("[log]\nrotate_length = 0\n", "[log] rotate_length: must be greater than 0"),
            ("[imap]\nconnect_timeout = 0\n", "[imap] connect_timeout: must be greater than 0"),
            ("[imap]\nbatch_bytes = -1\n", "[imap] batch_bytes: must be greater than 0"),
            ("[imap]\nmax_message_size = 0\n", "[imap] max_message_size: must be greater"),
            ('[imap]\ntoo_large_keyword = "two words"\n', "[imap] too_large_keyword: must be"),
            ('[imap]\ntoo_large_keyword = "\\\\Seen"\n', "[imap] too_large_keyword: must be"),
            ("[backoff]\ninitial = 60\nmaximum = 30\n", "[backoff] maximum: must be at least initial"),
            ("[backoff]\njitter = 1.0\n", "[backoff] jitter: must be from 0"),
            ('[reporter]\nurl = "ftp://x"\n', "[reporter] url: must be an http:// or https://"),
            ("[reporter]\nqueue_size = 0\n", "[reporter] queue_size: must be at least 1"),
            ("[reporter]\ntimeout = 0\n", "[reporter] timeout: must be greater than 0"),
        ]
        for text, expected in cases:
            self.assertIn(expected, self.error(text), text)

    def test_valid_redis_schemes(self):
        for url in ("redis://h:1/0", "rediss://u:p@h:1/2", "unix:///run/redis.sock?db=1"):
            self.assertEqual(self.load(f'[redis]\nurl = "{url}"\n').redis.url, url)

    def test_repr_hides_the_redis_password(self):
        s = self.load('[redis]\nurl = "redis://fido:s3cret@h:6379/0"\n')
        self.assertNotIn("s3cret", repr(s))
        self.assertIn("redis://fido:***@h:6379/0", repr(s))

    def test_config_error_is_one_line(self):
        self.assertEqual(str(ConfigError("a\nb")), "a b")


class ClusterAndReplicaTests(_TmpDirMixin, SynchronousTestCase):
    setUp = ParseTests.setUp
    load = ParseTests.load
    error = ParseTests.error

    def test_lease_mode_sentinel_url_and_replicas_are_read(self):
        s = self.load(
            '[cluster]\nmode = "lease"\nlease_ttl = 30\n'
            '[redis]\nurl = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/m/0"\n'
            "min_replicas = 1\n"
        )
        self.assertEqual((s.cluster.mode, s.cluster.lease_ttl), ("lease", 30.0))
        self.assertEqual(s.redis.min_replicas, 1)

    def test_bad_cluster_and_replica_values_are_one_line(self):
        for text, words in [
            ('[cluster]\nmode = "raft"\n', "[cluster] mode: must be one of"),
            ("[cluster]\nlease_ttl = 1\n", "[cluster] lease_ttl: must be from 3"),
            ('[cluster]\nmode = "lease"\n[fido]\nshard = "1/2"\n', 'leave [fido] shard'),
            ("[redis]\nmin_replicas = -1\n", "[redis] min_replicas: must be at least 0"),
            ('[redis]\nurl = "redis+sentinel://h1"\n', "name the master"),
        ]:
            self.assertIn(words, self.error(text))


class ShardParseTests(SynchronousTestCase):
    def test_parse_shard(self):
        self.assertEqual(config.parse_shard("1/1"), (1, 1))
        self.assertEqual(config.parse_shard("3/4"), (3, 4))
        for bad in ("0/1", "2/1", "1/0", "a/b", "1", "", " 1/1", "1/1\n"):
            self.assertRaises(ValueError, config.parse_shard, bad)


_toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-10, 10**9),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["1/1", "2/3", "redis://h", "json", "debug", "auto", ""]),
)
_keys = st.sampled_from(
    sorted({f.name for cls in config.SECTIONS.values() for f in attr.fields(cls)})
    + ["bogus"]
)
_sections = st.dictionaries(
    st.sampled_from(sorted(config.SECTIONS) + ["extra"]),
    st.one_of(st.dictionaries(_keys, _toml_scalars, max_size=5), _toml_scalars),
    max_size=4,
)


class ParseNeverCrashesTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_sections)
    def test_only_config_errors(self, data):
        try:
            s = config.parse_settings(data, "/x/fido.toml")
        except ConfigError as e:
            self.assertNotIn("\n", str(e))
            self.assertTrue(str(e).startswith("/x/fido.toml: "))
        else:
            self.assertIsInstance(s, Settings)
            self.assertGreaterEqual(s.fido.workers, 1)


class FiniteNumberTests(_TmpDirMixin, SynchronousTestCase):
    def test_nan_and_inf_are_rejected(self):
        roots = self.make_roots()
        for value in ("nan", "inf", "-inf"):
            path = self.write("f.toml", f"[fido]\npoll_interval = {value}\n")
            e = self.assertRaises(ConfigError, load_settings, path, {}, roots)
            self.assertIn("[fido] poll_interval: must be a finite number", str(e))


class RedisUrlTests(_TmpDirMixin, SynchronousTestCase):
    def test_malformed_redis_url_is_named_without_the_password(self):
        roots = self.make_roots()
        path = self.write("f.toml", '[redis]\nurl = "redis://u:pa/ss@host:notaport/0"\n')
        e = self.assertRaises(ConfigError, load_settings, path, {}, roots)
        self.assertIn("[redis] url:", str(e))
        self.assertNotIn("pa/ss", str(e))

    def test_repr_hides_a_password_with_a_slash(self):
        s = config.RedisSettings(url="redis://u:pa/ss@h:1/0")
        self.assertNotIn("pa/ss", repr(s))
        self.assertNotIn("ss@", repr(s))
