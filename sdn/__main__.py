import sys

from sdn.main import main

sys.exit(main())
