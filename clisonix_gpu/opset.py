"""``OpSet``: the package's ops gathered as methods of one object."""

from __future__ import annotations

from .ops.binary import binarize, binary_matmul, hamming_distance, hamming_radius, hamming_topk, pack_bits, unpack_bits
from .ops.svd_compress import svd_compress
from .ops.transform_matrix import transform_matrix


class OpSet:
    """Every op of the package as a method, for code that passes one object around (a backend
    under test, a mock in a unit test).

    Each method is the module-level op of the same name, with the same arguments and errors.
    ``BinaryAlgebra`` is the same class under its first name.

    Example:

    >>> cg.OpSet().transform_matrix(np.ones((1, 2)), np.ones((3, 2))).tolist()
    [[2.0, 2.0, 2.0]]
    """

    transform_matrix = staticmethod(transform_matrix)
    svd_compress = staticmethod(svd_compress)
    pack_bits = staticmethod(pack_bits)
    unpack_bits = staticmethod(unpack_bits)
    binarize = staticmethod(binarize)
    binary_matmul = staticmethod(binary_matmul)
    hamming_distance = staticmethod(hamming_distance)
    hamming_topk = staticmethod(hamming_topk)
    hamming_radius = staticmethod(hamming_radius)

    def __repr__(self) -> str:
        return "OpSet()"


BinaryAlgebra = OpSet  # the first name, kept for existing code: it holds every op, not only the binary ones

__all__ = ["BinaryAlgebra", "OpSet"]
