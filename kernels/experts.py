"""Names shared by every kernel and by the routing core: the expert ids and names, and the
kernel backends a caller may ask for.

The order (full, linear, local) is the order of the last axis of the routing weights
everywhere in the project; `metaattn_viz.core.experts` imports these and adds the policy's
notional costs and letters. Never: add behaviour or imports here; this module is only
names, so that torch-free code (settings, the store) can use them.
"""

FULL, LINEAR, LOCAL = 0, 1, 2
EXPERTS = ("full", "linear", "local")
# "auto": Triton on CUDA, the fast PyTorch path on CPU; "reference": the dense twins.
BACKENDS = ("auto", "cpu", "triton", "reference")
