"""``BinaryAlgebra``: the LIAM ops gathered as methods of one object."""

from __future__ import annotations

from . import ops


class BinaryAlgebra:
    """The package's ops as methods, for code that passes one algebra object around.

    Each method is the module-level op of the same name, with the same arguments and errors.

    >>> import numpy as np
    >>> cg.BinaryAlgebra().transform_matrix(np.ones((1, 2)), np.ones((3, 2))).tolist()
    [[2.0, 2.0, 2.0]]
    """

    transform_matrix = staticmethod(ops.transform_matrix)
    svd_compress = staticmethod(ops.svd_compress)
    pack_bits = staticmethod(ops.pack_bits)
    unpack_bits = staticmethod(ops.unpack_bits)
    binarize = staticmethod(ops.binarize)
    binary_matmul = staticmethod(ops.binary_matmul)
    hamming_distance = staticmethod(ops.hamming_distance)
    hamming_topk = staticmethod(ops.hamming_topk)
    hamming_radius = staticmethod(ops.hamming_radius)

    def __repr__(self) -> str:
        return "BinaryAlgebra()"


__all__ = ["BinaryAlgebra"]
