import sys

from klservice.cli import main

sys.exit(main())
