"""The `remoterun` command: its parser (main), `serve`, the admin commands, and the HTTP client verbs."""
