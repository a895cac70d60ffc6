"""One run and several: the iteration loop (``loop``), what each stage computes (``stages``),
when a finished stage may be reused (``reuse``), validation evaluations that choose an
iterate (``selection``), what produced a result (``provenance``), and several runs at once
on this machine (``launch``) or as Ray tasks (``launch_ray``).

Not here: the methods, judges, evaluations and training a stage calls (their own packages),
the checks made before a run starts (``harness.validate``), the command line (``harness.cli``).
"""
