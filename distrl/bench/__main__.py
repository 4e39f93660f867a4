"""``python -m distrl.bench``."""

import sys

from distrl.bench import main

sys.exit(main())
