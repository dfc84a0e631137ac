"""``python -m carclf`` is the ``carclf`` command."""

import sys

from carclf.cli import main

sys.exit(main())
