"""`python -m remoterun`: the same program as the `remoterun` command."""

from remoterun.cli import main

raise SystemExit(main())
