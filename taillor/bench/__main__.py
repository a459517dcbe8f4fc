"""``python -m taillor.bench`` = ``taillor bench``."""
import sys

from .command import main

sys.exit(main())
