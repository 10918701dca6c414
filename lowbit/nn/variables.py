"""NNX variable kinds the train loop treats specially."""

from flax import nnx


class OverwriteWithGradient(nnx.Variable):
    """State whose new value arrives as its gradient (GradScale).

    A train step differentiates with respect to these variables too and then
    replaces each value by its gradient instead of handing it to the optimizer;
    ``quantized_dot_general`` returns the updated GradScale as that gradient.
    """
