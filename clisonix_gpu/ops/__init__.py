"""The ops' host code: one module per op family, named as its kernel, test, benchmark and docs page.

- ``transform_matrix``: validate, then one implementation per backend (``launch_transform_matrix``
  is the Triton launcher that ``clisonix_gpu.torch`` wraps for tracing);
- ``svd_compress``: the randomized range finder on every backend;
- ``binary``: the public binary-algebra ops; ``binary._numpy``, ``._triton``, ``._cupy`` implement
  them, ``binary._search`` holds the search loop they share;
- ``activations``: each activation's NumPy forward, torch forward and gradient;
- ``utils``: launch helpers (``cdiv``, device context, interpreter switch, compile options).

The functions themselves are exported at the package's top level (``clisonix_gpu.transform_matrix``);
``clisonix_gpu.ops.transform_matrix`` is always the module.
"""
