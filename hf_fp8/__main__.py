"""`python -m hf_fp8 ...` is `hf-fp8 ...`."""

import sys

from hf_fp8.cli import main

sys.exit(main())
