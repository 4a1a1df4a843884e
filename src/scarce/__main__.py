"""``python -m scarce`` (used by ``torchrun ... -m scarce train``)."""

import sys

from scarce.cli import main

sys.exit(main())
