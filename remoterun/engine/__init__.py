"""The engine: the scheduler and the parts it is composed of (queue, attempts, hubs, feed, protection)."""
