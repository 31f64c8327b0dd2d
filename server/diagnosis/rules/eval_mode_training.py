"""eval_mode_training: the model is in eval mode during the forwards that lead to optimizer steps.

Source: "37 reasons why your neural network is not working" (train/eval mode:
dropout and BatchNorm behave differently). Signal: `training`, the model's
`.training` flag at each step's last grad-enabled forward (evaluation under
`torch.no_grad()` is not recorded, so validation between steps never counts).

A model made only of torch.nn modules that behave the same in both modes
(Linear, ReLU, LayerNorm, ...) trains identically in eval mode: then the
finding is only `info`. Anything else — Dropout, BatchNorm, recurrent layers
and transformer blocks (their dropout), or a custom module, whose forward may
read `self.training` — gets the catalogue's `warning`.
"""

from __future__ import annotations

from layerwatch.server.diagnosis.view import RunView
from layerwatch.server.records import Finding

RULE_ID = "eval_mode_training"

SUSTAIN_STEPS = 3  # consecutive steps in eval mode: not a one-off forward in the wrong mode

# torch.nn modules whose forward does not read `self.training`.
MODE_FREE_TYPES = frozenset(
    {
        *("Sequential", "ModuleList", "ModuleDict", "Identity", "Flatten", "Unflatten"),
        *("Linear", "Bilinear", "LazyLinear", "Embedding", "EmbeddingBag"),
        *("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"),
        *("MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d"),
        *("AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool2d"),
        *("LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm"),
        *("ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish"),
        *("Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid", "Hardswish", "Softplus", "Softsign"),
        *("Softmax", "LogSoftmax", "Softmin", "Threshold"),
    }
)


def check(view: RunView, state: dict) -> list[Finding]:
    training = view.record.signals.get("training")
    if training is None:
        return []
    if training:
        state["count"] = 0
        return []
    if not state.get("count"):
        state["since"] = view.step
    state["count"] = state.get("count", 0) + 1
    if state["count"] < SUSTAIN_STEPS:
        return []
    types = {m.get("type") for m in view.modules}
    mode_dependent = sorted(t for t in types if t not in MODE_FREE_TYPES)
    message = (
        f"the model was in eval mode (model.training is False) for the forwards of {state['count']} "
        f"consecutive optimizer steps (since step {state['since']})"
    )
    if types and not mode_dependent:
        message += "; none of its modules behaves differently in eval mode, so this changes nothing yet"
        severity = "info"
    else:
        message += f"; modules that may behave differently in eval mode: {', '.join(mode_dependent[:5])}"
        severity = "warning"
    evidence = {"since_step": state["since"], "steps": state["count"], "mode_dependent_types": mode_dependent[:20]}
    return [view.finding(RULE_ID, message, evidence=evidence, severity=severity)]
