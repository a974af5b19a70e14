"""Runs at interpreter start-up when this directory is on PYTHONPATH (the
compatibility harness puts it there): swaps toilcoord's names into Toil when
TOILCOORD_SWAP asks for it, then runs any other sitecustomize it hides."""

import os
import sys


def _chain() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("TOILCOORD_SWAP", "") not in ("", "0"):
    import toilcoord_swap

    if toilcoord_swap.wanted():
        toilcoord_swap.install()
_chain()
