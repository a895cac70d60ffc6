"""What the harness says: the terminal's stage lines and status lines (``terminal``), progress
bars (``progress``), a finished stage's numbers in a few words (``summary``) and the run's log
file with the capture of everything else that is written (``logs``).

Not here: the number formatters they share with the tables (``harness.fmt``), the metric
catalogue (``harness.metrics``), the leaderboard tables (``harness.report``).
Imports only ``harness.fmt`` and ``harness.metrics``.
"""
