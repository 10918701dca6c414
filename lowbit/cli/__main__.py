"""``python -m lowbit.cli``: the same as the ``lowbit`` script."""

import sys

from lowbit.cli.main import main

sys.exit(main())
