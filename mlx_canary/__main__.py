"""``python -m mlx_canary``: the same command line as the ``mlx-canary`` script."""

from mlx_canary.cli import main

raise SystemExit(main())
