"""``python -m toilcoord``: see ``python -m toilcoord --help``."""

from __future__ import annotations

import sys

from .cli import main

# Named by the module path it was run as: a vendored copy
# (``python -m vendor.toilcoord``) says so in its help and error lines.
sys.exit(main(prog=f"python -m {__spec__.parent if __spec__ else __package__}"))
