"""Everything about an experiment that can be known before a model loads (``harness validate``
and the start of ``harness run``): the whole experiment (``experiment.check``), the model it
names (``model``), values checked against the code that uses them (``values``) and the report
the checks collect (``report``).

Not here: parsing the experiment file (``harness.config``: its errors come first), running it
(``harness.run``). The one package that imports ``harness.run`` (for ``selection``).
"""
