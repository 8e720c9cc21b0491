"""``python -m mlx_canary``: the same command line as the ``mlx-canary`` script."""

from .cli import main

raise SystemExit(main())
