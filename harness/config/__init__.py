"""The experiment file as typed, frozen sections: strict parsing of nested dicts into
dataclasses with documented fields (``schema``), the experiment's sections (``experiment``),
a judge's section (``judge_section``), AlpacaEval annotator configs (``annotator_configs``)
and the name tables of methods and judges (``registry``).

Not here: the checks that need the code a value feeds (``harness.validate``), the methods and
judges themselves (filled into ``registry`` by ``harness.methods`` and ``harness.judges``).
Imports ``harness.store`` and ``harness.fmt``; ``harness.models`` only to pick a device.
"""
