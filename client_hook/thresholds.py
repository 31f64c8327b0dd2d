"""Thresholds shared by a preflight check and the live rule of the same id: each defined once, here.

Torch-free and shared like `wire` and `catalog`: `client_hook/preflight/checks.py`
(before training, on one batch) and `server/diagnosis/rules/<id>.py` (during
training, on the stream) import these, so the two can never disagree about what
counts as a finding. Thresholds only one side uses stay in that side's module.
"""

# loss_at_init: |loss0 - ln C| > LOSS_AT_INIT_TOLERANCE * ln C. "37 reasons why your neural
# network is not working" (Slav Ivanov, 2017): the expected initial loss is -ln(1/C);
# Karpathy, "A Recipe for Training Neural Networks" (2019): "verify loss @ init".
LOSS_AT_INIT_TOLERANCE = 0.5

# input_not_normalized: |mean| > 10 or std > 10 or std < 1e-3. "37 reasons": normalize
# features; UMLAUT / DeepDiagnosis use [-1, 1], too eager for standardized data.
INPUT_MEAN_MAX, INPUT_STD_MAX, INPUT_STD_MIN = 10.0, 10.0, 1e-3

# single_class_batch: batches smaller than this are single-class by chance too often
# ("37 reasons": shuffle the dataset).
SINGLE_CLASS_MIN_BATCH = 8

# class_imbalance: majority / minority count. Above 10 is worth knowing (info); above 100 a
# plain loss mostly learns the majority (warning) — DIAGNOSTICS.md.
IMBALANCE_INFO, IMBALANCE_WARNING = 10.0, 100.0
