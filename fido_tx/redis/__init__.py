"""Redis in one place: the shared connection and the small classes on it (state, heartbeat, leases), URLs, Sentinel."""
