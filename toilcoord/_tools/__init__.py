"""Tooling for toilcoord's own developers and for admins who measure:
``bench`` (each primitive beside its physical floor) and ``torture`` (every
primitive under random SIGKILLs, with its invariants checked).

Not part of the library: nothing outside this folder imports it but the
command line, and only when asked to bench or torture. A vendored copy may
leave the folder out; ``python -m toilcoord bench`` then says so in one line.
"""
