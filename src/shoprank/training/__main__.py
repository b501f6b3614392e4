"""``python -m shoprank.training --config-json PATH [--set KEY=VALUE ...]``"""

import sys

from shoprank.training.run import main

if __name__ == "__main__":
    sys.exit(main())
