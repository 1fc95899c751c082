"""``python -m trainers <command> ...``: see :mod:`trainers.cli`."""

import sys

from .training.determinism import request_reproducible_blas

request_reproducible_blas()  # before any import below could start MKL
from .cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
