"""``python -m gradsafe.bench``: ``gradsafe bench``."""

import sys

from . import main

sys.exit(main())
