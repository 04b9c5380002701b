import sys

from smm.main import main

sys.exit(main())
