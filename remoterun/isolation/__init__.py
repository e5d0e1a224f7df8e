"""Isolation around a run: one Sandbox in front of bwrap, Docker and none, with rlimits and cgroups."""
