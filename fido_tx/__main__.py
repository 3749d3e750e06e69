"""``python -m fido_tx``: the operator's command."""

import sys

from fido_tx.cli import main

sys.exit(main())
