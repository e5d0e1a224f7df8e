"""RemoteRun: run scripts from a server's scripts/ directory, watch them live, keep every byte."""

__version__ = "0.1.0"
