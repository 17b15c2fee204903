import sys

from qbara.cli import main

sys.exit(main())
