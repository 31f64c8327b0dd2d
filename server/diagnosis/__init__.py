"""The diagnosis engine: the training-debugging checklist, run on stored statistics.

`history` keeps a bounded window of each run's data (fed from the same frames
that are stored), `view` is what a rule sees at one step, `rules/` holds one
module per rule id of DIAGNOSTICS.md, and `engine` runs them live after each
committed batch and again on a stored run (`layerwatch diagnose`).
"""
