"""`python -m npo_merge` runs the same CLI as the `npo-merge` console script."""

import sys

from npo_merge.cli import main

sys.exit(main())
