"""``python -m gramstyle.client.cli`` runs the ``gramstyle`` command."""

import sys

from gramstyle.client.cli import main

sys.exit(main())
