"""`python -m remoterun`: the same program as the `remoterun` command."""

from remoterun.cli.main import main

raise SystemExit(main())
