"""fermsca: multiscale convolutional attention residual network for facial expression recognition.

Implements Wang & Zhang, "Multiscale Convolutional Attention-based Residual Network Expression
Recognition", Journal of Internet Technology 24(5), 2023, in JAX/Flax.
"""

__version__ = "0.1.0"
