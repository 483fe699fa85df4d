"""``python -m cascade`` (and ``torchrun -m cascade``) run the command line."""

from cascade.cli.main import main

raise SystemExit(main())
