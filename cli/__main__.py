"""``python -m gramstyle.cli`` runs the ``gramstyle`` command."""

import sys

from gramstyle.cli import main

sys.exit(main())
