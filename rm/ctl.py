"""picoctl: not implemented yet; see shared/stub.py."""
import sys

from shared.stub import ctl_main as main

if __name__ == "__main__":
    sys.exit(main())
