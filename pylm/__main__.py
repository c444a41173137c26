"""``python -m pylm``: the ``pylm`` command."""

from pylm.cli import main

raise SystemExit(main())
