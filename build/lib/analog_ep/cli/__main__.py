"""`python -m analog_ep.cli`: the `seqep` command, for launchers that start a module (`torchrun -m analog_ep.cli`)."""

import sys

from analog_ep.cli import main

if __name__ == "__main__":
    sys.exit(main())
