"""The activations of ``transform_matrix``: their names and constants, in one place.

Imported by the Triton epilogue (``kernels/activations.py``) and by the host
(``clisonix_gpu/ops/activations.py``: NumPy forward, torch forward and backward). Needs no Triton.
"""

# Every activation an op accepts, in the order users see them; None is the identity.
# The mesh sends an activation as its index in this tuple: append, never reorder.
ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")

LEAKY_RELU_SLOPE = 0.01  # torch.nn.functional.leaky_relu's default
SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2): gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))
SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi): gelu_tanh's scale
GELU_TANH_CUBIC = 0.044715  # gelu_tanh's cubic coefficient
