import sys

from bncore.cli import main

sys.exit(main())
