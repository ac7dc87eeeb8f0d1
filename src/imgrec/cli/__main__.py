import sys

from imgrec.cli import main

sys.exit(main())
