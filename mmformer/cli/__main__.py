"""`python -m mmformer.cli`."""

import sys

from mmformer.cli.main import main

sys.exit(main())
