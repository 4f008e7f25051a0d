"""`python -m agent` is the same as the `config-agent` command."""

from agent.cli import main

raise SystemExit(main())
