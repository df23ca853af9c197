"""gdn_jax: the gated delta net recurrence (GDA and KDA) as a first-class JAX op.

    from gdn_jax import gated_delta_net
    o, final_state = gated_delta_net(q, k, v, g, beta, initial_state=s, output_final_state=True)
"""
from .api import RECURRENT_MAX_T, gated_delta_net
from .chunked import chunked_gated_delta_net
from .recurrent import recurrent_gated_delta_net
from .reference import reference_gated_delta_net
from .sharding import sharded_gated_delta_net

__all__ = [
    "gated_delta_net",
    "reference_gated_delta_net",
    "recurrent_gated_delta_net",
    "chunked_gated_delta_net",
    "sharded_gated_delta_net",
    "RECURRENT_MAX_T",
]
__version__ = "0.1.0"
