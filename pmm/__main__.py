import sys

from pmm.main import main

sys.exit(main())
