"""``python -m distrl.bench``: see ``distrl.bench``."""

import sys

from distrl.bench import main

# The guard keeps the bench from running again in a process a vLLM engine may spawn.
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
