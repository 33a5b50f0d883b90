"""Expert ids and names shared by every kernel and by the routing core.

The order (full, linear, local) is the order of the last axis of the routing weights
everywhere in the project. Never: add behaviour here; this module is only names.
"""

FULL, LINEAR, LOCAL = 0, 1, 2
EXPERTS = ("full", "linear", "local")
