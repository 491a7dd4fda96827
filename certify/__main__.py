import sys

from certify.commands.cli import main

sys.exit(main())
