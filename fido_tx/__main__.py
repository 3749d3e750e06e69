"""``python -m fido_tx``: the operator's command."""

import sys

from fido_tx.cmd.cli import main

sys.exit(main())
