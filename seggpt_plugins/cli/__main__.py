"""`python -m seggpt_plugins.cli`: the `seggpt` command."""

import sys

from .main import main

sys.exit(main())
