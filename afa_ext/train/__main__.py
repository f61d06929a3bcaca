"""``python -m afa_ext.train``: the trainer's command line."""

import sys

from .cli import main

sys.exit(main())
