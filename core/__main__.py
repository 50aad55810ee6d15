"""`python -m core`: the Identity Tokens command line."""

import sys

from .cli import main

sys.exit(main())
