"""Where the accounts come from: the Account value, the accounts file, its watcher and live reload."""
