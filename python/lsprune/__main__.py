"""``python -m lsprune`` = the ``lsprune`` command."""
from .cli.main import main

raise SystemExit(main())
