import sys

from flexsfl.cli import main

sys.exit(main())
