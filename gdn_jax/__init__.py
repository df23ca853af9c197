"""gdn_jax: the gated delta net recurrence as a first-class JAX op."""
from .reference import reference_gated_delta_net

__all__ = ["reference_gated_delta_net"]
