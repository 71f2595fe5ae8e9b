"""`python -m ualm_jax.cli ...` (what the tests and launchers spawn) is `ualm ...`."""
import sys

from ualm_jax.cli import main

sys.exit(main())
