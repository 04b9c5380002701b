"""pico-sdn: not implemented yet; see shared/stub.py."""
import sys

from shared.stub import sdn_main as main

if __name__ == "__main__":
    sys.exit(main())
