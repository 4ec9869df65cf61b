"""`python -m server` is the `recserve` command."""

from server.cli import main

raise SystemExit(main())
