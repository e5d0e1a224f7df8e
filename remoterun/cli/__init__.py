"""The `remoterun` command: `serve` and the admin commands (main), and the HTTP client commands."""
