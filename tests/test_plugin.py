"""The twistd plugin is found from any working directory."""

import tempfile
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from tests.daemon import twistd


def _twistd(*args, cwd):
    return subprocess.run(
        [twistd(), *args],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )


class PluginTests(SynchronousTestCase):
    def test_twistd_lists_fido_from_another_directory(self):
        result = _twistd("--help", cwd=tempfile.mkdtemp())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\n\s+fido\s+Fetch IMAP mailboxes")
        self.assertIn("--pidfile", result.stdout, "this is twistd, not twist")

    def test_twistd_fido_help_shows_the_options(self):
        result = _twistd("fido", "--help", cwd="/")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--config", result.stdout)
        self.assertIn("--dry-run", result.stdout)
