# The twistd plugin: a few lines, everything else is imported lazily when
# ``twistd fido`` actually runs (so ``twistd --help`` stays cheap and no
# reactor is installed by the plugin scan).
from twisted.application.service import ServiceMaker

fido = ServiceMaker(
    "Fido",
    "fido_tx.tap",
    "Fetch IMAP mailboxes into a Redis stream, exactly once.",
    "fido",
)
