"""`python -m meshpy`: the same as the `meshpy` command."""

from .cli import main

raise SystemExit(main())
