"""``python -m outliers.cli``, as the ``outliers`` entry point."""

import sys

from outliers.cli import main

sys.exit(main())
