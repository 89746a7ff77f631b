"""featcache's benchmark (``make bench`` = ``python -m benchmarks``; ``--quick`` for the
one-minute smoke version CI runs).

Nine sections, each a module, each measuring ratios side by side in one run:

1. :mod:`benchmarks.tutorial` — the tutorial's recipe (backbone frozen inside the model,
   trained through it) vs featcache (backbone once into the cache, same head on it), and
   the tutorial's 32 px ``/255`` input vs the correct one;
2. :mod:`benchmarks.throughput` — stage one's images/s vs the bare backbone's, and the
   backbone's FLOP/s vs a large float32 matmul's;
3. and 5. :mod:`benchmarks.processes` — peak RSS of stage one at two dataset sizes, and a
   repeated run with nothing changed, each in its own process;
4. :mod:`benchmarks.stage2` — fit/predict seconds of each default head, full comparison;
6. :mod:`benchmarks.runtimes` — stage one by runtime; 7. :mod:`benchmarks.finetune_mem` — the
   ``finetune`` head's peak memory at two row counts; 8. :mod:`benchmarks.predict` —
   ``featcache predict`` by runtime;
9. :mod:`benchmarks.finetune_usual` — fine-tuning the usual way (every image through the
   whole backbone every epoch) vs from the cache (stage one with a cut, then the top).

:mod:`benchmarks.env` holds the settings and what was found on the machine;
:mod:`benchmarks.report` writes ``BENCHMARKS.md`` and its chart; :mod:`benchmarks.run` is
the command line. Reads CIFAR-10 and the ImageNet weights where they are (else the
synthetic set / random weights, said loudly); writes the report, the chart, and scratch
files under ``bench-out/``.
"""
