"""Who runs when: the scheduler, backoff, the in-flight byte budget, start pacing, backpressure, cluster leases."""
