import sys

from longext.cli import main

sys.exit(main())
