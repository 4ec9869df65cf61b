"""`python -m recserve` is the `recserve` command."""

from recserve.cli import main

raise SystemExit(main())
