"""The ``fido`` operator commands (``init``, ``keygen``, ``encrypt``, ``check``, ``status``, ``demo``, ``import-mailroom``)."""
