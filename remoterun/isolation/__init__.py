"""Isolation around a run: one Sandbox in front of bwrap, Docker, gVisor and none, with rlimits and cgroups."""
