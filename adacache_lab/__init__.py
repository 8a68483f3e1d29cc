"""adacache_lab: what runs adacache_fx on bundled models, kept out of the library itself.

* :mod:`adacache_lab.zoo`: diffusers transformer classes at tiny configs with matching inputs (the
  tests' models, also used by the benchmarks and ``adacache-fx inspect``);
* :mod:`adacache_lab.reference`: the reference video DiT, its synthetic clips, training, judge, demo
  and quality bench (``adacache-fx demo``, ``adacache-fx bench``);
* :mod:`adacache_lab.sampling`: a minimal denoising loop for demos and benchmarks;
* :mod:`adacache_lab.cli`: the ``adacache-fx`` command line.
"""
