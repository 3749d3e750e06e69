"""What people and machines see: account state and reports, logs, metrics, health, the status page."""
