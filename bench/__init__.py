"""The benchmark suite: one ``bench_<op>.py`` per op against its peers, run by ``clisonix-gpu bench``.

It ships with the package as ``clisonix_gpu.bench`` (as ``kernels/`` ships as ``clisonix_gpu.kernels``),
so an installed package can time itself; the committed reference results (``bench/results``) stay in
the source checkout.
"""
