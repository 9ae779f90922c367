"""`python -m minidream.convert`: kept at the top so the command stays short; the code is io/convert.py."""

import sys

from minidream.io.convert import main

if __name__ == "__main__":
    sys.exit(main())
