"""NNX variable kinds the train loop treats specially, and the per-op quantizer state."""

from flax import nnx

from lowbit.recipes.op import next_key


class OverwriteWithGradient(nnx.Param):
    """State whose new value arrives as its gradient (GradScale, amax histories).

    ``quantized_dot_general`` returns the updated state as its gradient, so a
    train step must differentiate it and then replace each value by its
    gradient instead of stepping it like a weight. It is an ``nnx.Param`` so that
    any loop differentiates it (``nnx.grad`` and ``nnx.Optimizer(...,
    wrt=nnx.Param)`` select Params); ``lowbit.optimizer(tx)`` then does the
    replacing, and lowbit's own step splits it off first (a filter list that
    names ``OverwriteWithGradient`` must name it before ``nnx.Param``: the first
    matching filter wins).
    """


class QuantKey(nnx.Variable):
    """An op's stochastic-rounding key (raw ``uint32`` key data), advanced on every call.

    Not trained and not differentiated: the train loop carries it with the rest
    of the model state, so a resumed run draws the same keys.
    """


class QuantParam(nnx.Param):
    """A learned quantizer parameter (LSQ step, PACT clip): an ``nnx.Param``, so optimizers train it."""


# Linen collections of lowbit.quantize (lowbit.nn.quantize.LINEN_COLLECTIONS) map to these types when a
# quantized linen model goes through flax.nnx.bridge, so the NNX train loop treats them as on NNX models.
nnx.register_variable_name("lowbit_params", QuantParam)
nnx.register_variable_name("lowbit_overwrite", OverwriteWithGradient)
nnx.register_variable_name("lowbit_rng", QuantKey)


class OpState(nnx.Module):
    """The quantizer state of one op, as NNX variables (see ``lowbit.recipes.op``).

    Learned steps and clips are ``QuantParam`` (an ``nnx.Param``: the optimizer trains them),
    GradScale is ``OverwriteWithGradient`` and the stochastic-rounding key a
    ``QuantKey``.
    """

    _TYPES = {"param": QuantParam, "overwrite": OverwriteWithGradient, "rng": QuantKey}

    def __init__(self, state: dict):
        for name, (category, value) in state.items():
            setattr(self, name, self._TYPES[category](value))

    def values(self) -> dict:
        """Current values by name (``sr_key`` excluded: use ``next_key``)."""
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Variable) and k != "sr_key"}

    def next_key(self):
        """This call's stochastic-rounding key (advancing the state), or ``None`` if the op has none."""
        if not isinstance(getattr(self, "sr_key", None), QuantKey):
            return None
        key, self.sr_key[...] = next_key(self.sr_key[...])
        return key
