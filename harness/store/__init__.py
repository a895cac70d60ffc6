"""The run directory on disk: its layout (``rundir``), atomic writes, content hashes, stage
directories and manifests, resumable JSONL and the run lock (``files``), and what a stage
cost (``cost``), recorded in its manifest.

Not here: what a stage computes (``harness.run.stages``), when a finished stage may be reused
(``harness.run.reuse``), results tables (``harness.report``). Imports only ``harness.fmt``.
"""
