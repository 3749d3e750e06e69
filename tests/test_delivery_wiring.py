"""The composition root builds webhook and sidekiq deliveries from
``[delivery.NAME]`` tables and makes the sinks with resources of their own
(connection pool, own Redis connection) children of the service tree."""

import base64
import os
import shutil
import tempfile

from twisted.application.service import IService
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import config, service
from fido_tx.sinks.sidekiq import SidekiqSink
from fido_tx.sinks.webhook import WebhookSink


class WiringTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        with open(os.path.join(self.dir, "secret"), "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode())
        with open(os.path.join(self.dir, "accounts.json"), "w") as f:
            f.write('{"accounts": []}')
        self.path = os.path.join(self.dir, "fido.toml")
        with open(self.path, "w") as f:
            f.write(f"""
[fido]
accounts_file = "accounts.json"
key_file = ""
state_dir = "{self.dir}"

[redis]
url = "redis://127.0.0.1:1/0"

[http]
listen = ""

[routing]
template = "incoming+%{{key}}@gitlab.example.com"

[delivery.incoming_email]
kind = "webhook"
url = "https://gitlab.example.com/api/v4/internal/mail_room/incoming_email"
auth = "gitlab-jwt"
secret_file = "secret"
timeout = 10

[delivery.jobs]
kind = "sidekiq"
queue = "default"
worker = "ServiceDeskEmailReceiverWorker"

[delivery.redis]
kind = "sidekiq"
redis_url = "redis://127.0.0.1:2/0"
""")

    def test_sinks_built_and_parented(self):
        settings = config.read_settings(self.path)
        self.assertEqual(settings.routing.template, "incoming+%{key}@gitlab.example.com")
        top = service.make_service(settings, MemoryReactorClock(), observer=False)
        sinks = top.parts["sinks"]
        self.assertIsInstance(sinks["incoming_email"], WebhookSink)
        self.assertIsInstance(sinks["jobs"], SidekiqSink)
        self.assertEqual(sinks["incoming_email"].url.rsplit("/", 1)[1], "incoming_email")
        for name in ("incoming_email", "jobs", "redis"):
            self.assertTrue(IService.providedBy(sinks[name]))
            self.assertIs(sinks[name].parent, top, name)
        # a delivery named "redis" does not take the connection's service name
        self.assertIs(top.getServiceNamed("redis"), top.parts["redis"])
