"""The `remoterun` command: its parser (main), `serve`, the admin commands, the client verbs."""
