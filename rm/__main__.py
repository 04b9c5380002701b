import sys

from rm.main import main

sys.exit(main())
