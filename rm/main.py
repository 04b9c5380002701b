"""pico-rm: not implemented yet; see shared/stub.py."""
import sys

from shared.stub import rm_main as main

if __name__ == "__main__":
    sys.exit(main())
