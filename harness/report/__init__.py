"""Leaderboards from result rows: ``rows`` (results.jsonl read and checked), ``table``
(the data frame), ``files`` (Markdown, CSV), ``terminal`` (the fitted terminal table),
``html`` (the self-contained page, with its ``leaderboard.css`` / ``.js``), ``plots``
(PNG figures) and ``board`` (all of it in one call, and the boards a run writes);
``protocol``: each row's AlpacaEval and lm-eval protocols and their labels (numbers of
different protocols get separate columns, and AlpacaEval's separate panels, never one
ranking); ``compare`` (``harness table --compare``: two runs paired on their shared items,
only under one protocol); ``card`` (the model card of an exported iterate, harness.export);
``columns`` (the column vocabulary) and ``seeds`` (several seeds as one row) serve ``table``.
Not here: computing any metric (``harness.evaluate``), the command line (``harness.cli``).

What each metric means and where it is shown is the catalogue's (harness.metrics);
the cost line is harness.store.cost's. The names below are the package's public ones.
"""

from harness.report.board import FORMATS, Board, combined_board, leaderboard, run_board
from harness.report.files import formatted, read_csv, to_csv, to_markdown
from harness.report.html import to_html
from harness.report.plots import render_plots, save_plots, write_plots
from harness.report.rows import PUBLISHED, RESULTS_FILE, ResultsError, load_rows
from harness.report.table import build_table
from harness.report.terminal import TERMINAL_WIDTH, to_terminal

__all__ = ["FORMATS", "PUBLISHED", "RESULTS_FILE", "TERMINAL_WIDTH", "Board", "ResultsError", "build_table",
           "combined_board", "formatted", "leaderboard", "load_rows", "read_csv", "render_plots", "run_board",
           "save_plots", "to_csv", "to_html", "to_markdown", "to_terminal", "write_plots"]
