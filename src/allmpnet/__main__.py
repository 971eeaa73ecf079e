import sys

from allmpnet.cli import main

sys.exit(main())
