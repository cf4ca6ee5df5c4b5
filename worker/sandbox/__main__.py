"""``python -m worker.sandbox``: run the sandbox (same options as ``paypoll sandbox``)."""

from __future__ import annotations

import sys

from worker.sandbox.cli import main

if __name__ == "__main__":
    sys.exit(main())
