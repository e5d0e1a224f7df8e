"""The engine: the scheduler and the parts it is composed of (queue, runs, hubs, feed...)."""
