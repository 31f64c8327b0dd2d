"""The rule catalogue: every finding id, its default severity, remedy and source.

Written once, here, torch-free, and shared like the wire schema: the server's
diagnosis rules (`server/diagnosis/rules/`) and the client's preflight checks
take their ids and remedy texts from this table, so a finding reads the same
wherever it comes from. Ids are public (../shared/DIAGNOSTICS.md) and never
change; a rule may add evidence, never rename.
"""

from __future__ import annotations

from dataclasses import dataclass

from client_hook.wire import SEVERITIES, severity_rank  # noqa: F401  (re-exported: one definition, in wire)


@dataclass(frozen=True)
class RuleInfo:
    id: str
    severity: str  # the default; a rule may escalate (e.g. dead_units at 100%)
    title: str
    remedy: str
    source: str


def _rule(id: str, severity: str, title: str, remedy: str, source: str) -> RuleInfo:
    assert severity in SEVERITIES, severity
    return RuleInfo(id, severity, title, remedy, source)


RULES: dict[str, RuleInfo] = {
    r.id: r
    for r in (
        _rule(
            "non_finite",
            "critical",
            "NaN/Inf appeared",
            "Lower the learning rate; clip gradients (torch.nn.utils.clip_grad_norm_); look for division by zero, "
            "log(0), sqrt of negatives or exp overflow in that layer and add an eps; with AMP, check the GradScaler.",
            '"37 reasons why your neural network is not working": NaN — find the first layer where it appears',
        ),
        _rule(
            "exploding_gradients",
            "critical",
            "Gradients are exploding",
            "Clip gradients (torch.nn.utils.clip_grad_norm_), lower the learning rate, check the initialisation of "
            "recurrent weights.",
            "Pascanu et al. 2013; AutoTrainer (ICSE'21); DL4J update-ratio spikes",
        ),
        _rule(
            "vanishing_gradients",
            "warning",
            "Gradients are vanishing",
            "Use ReLU/GELU instead of sigmoid/tanh, He/Xavier initialisation, normalization layers, residual "
            "connections.",
            "Glorot & Bengio 2010; AutoTrainer (ICSE'21)",
        ),
        _rule(
            "update_ratio_high",
            "warning",
            "Updates are too large for the weights",
            "Lower the learning rate for this layer or its parameter group.",
            'CS231n ("ratio of updates to weights ~1e-3"); DL4J; DeepDiagnosis (ICSE\'22)',
        ),
        _rule(
            "update_ratio_low",
            "warning",
            "Updates are too small to learn",
            "Raise the learning rate; check that the optimizer got these parameters.",
            "CS231n; DL4J; DeepDiagnosis (ICSE'22)",
        ),
        _rule(
            "weights_not_updating",
            "warning",
            "Weights are not updating",
            "Pass these parameters to the optimizer; check requires_grad, the param groups and any group with lr=0.",
            'Unit test that weights update; "37 reasons": frozen layers',
        ),
        _rule(
            "frozen_parameters",
            "info",
            "Frozen parameters",
            "Nothing to do if they are frozen on purpose.",
            '"37 reasons": frozen layers',
        ),
        _rule(
            "dead_units",
            "warning",
            "Dead units",
            "Lower the learning rate; check the bias initialisation; try LeakyReLU/GELU; add normalization.",
            'CS231n ("40% of the network dead"); AutoTrainer; DeepDiagnosis',
        ),
        _rule(
            "saturated_units",
            "warning",
            "Saturated units",
            "Normalize the inputs; use a smaller initialisation; add normalization layers.",
            "DeepDiagnosis (ICSE'22)",
        ),
        _rule(
            "activation_scale",
            "info",
            "Activation scale is off",
            "Check the initialisation and add normalization layers.",
            'DL4J visualization guide; "37 reasons"',
        ),
        _rule(
            "loss_diverging",
            "critical",
            "Loss is diverging",
            "Check the sign of the loss and the optimizer direction (minimising, not maximising); lower the learning "
            "rate.",
            'Training-debugging guides: "loss growing -> sign flipped", "exploding -> LR too high"',
        ),
        _rule(
            "loss_oscillating",
            "warning",
            "Loss oscillates without progress",
            "Lower the learning rate; check the labels; check the strength of the data augmentation.",
            'Training-debugging guides: "oscillating -> lower LR, check labels and augmentation"',
        ),
        _rule(
            "loss_plateau",
            "warning",
            "Loss has plateaued",
            "Raise the learning rate; lessen regularization; check the data and labels.",
            'Training-debugging guides: "plateau -> raise LR, remove regularization"',
        ),
        _rule(
            "loss_at_init",
            "warning",
            "Initial loss is not what chance predicts",
            "Check the output layer's initialisation and scale, a double softmax, and the loss inputs (NLLLoss takes "
            "log-probabilities, CrossEntropyLoss takes logits).",
            '"37 reasons": expected initial loss -ln(1/C); Karpathy, "A Recipe for Training Neural Networks"',
        ),
        _rule(
            "eval_mode_training",
            "warning",
            "Training in eval mode",
            "Call model.train() before the training loop (dropout and BatchNorm behave differently in eval mode).",
            '"37 reasons": train/eval mode',
        ),
        _rule(
            "repeated_batch",
            "warning",
            "The same batch every step",
            "Check the data loader / iterator (overfitting one batch on purpose is a good sanity check; if that is "
            "what you are doing, ignore this).",
            '"37 reasons": same batch every time',
        ),
        _rule(
            "input_not_normalized",
            "warning",
            "Inputs are not normalized",
            "Standardize the inputs (e.g. divide images by 255, subtract the mean and divide by the std).",
            '"37 reasons": normalize features; UMLAUT (CHI\'21); DeepDiagnosis',
        ),
        _rule(
            "single_class_batch",
            "warning",
            "Batches hold a single class",
            "Shuffle the dataset (DataLoader(shuffle=True)) or use a sampler.",
            '"37 reasons": shuffle the dataset',
        ),
        _rule(
            "class_imbalance",
            "info",
            "Classes are imbalanced",
            "Use a weighted loss or resampling; set the output bias to log(pos/neg).",
            "Training-debugging guides on class imbalance",
        ),
        _rule(
            "amp_overflow",
            "critical",
            "Mixed precision overflows: most steps skipped",
            "Find the op that overflows float16 (activations past 65504, the layer named by non_finite); train in "
            "bfloat16 (torch.autocast(dtype=torch.bfloat16) needs no scaler); lower the learning rate; keep the "
            "loss and softmax in float32.",
            "PyTorch AMP docs (torch.amp.GradScaler skips steps whose gradients hold inf/NaN; backoff_factor 0.5, "
            "growth_interval 2000); Micikevicius et al. 2018, Mixed Precision Training",
        ),
        _rule(
            "dead_network",
            "critical",
            "The network is dead: its gradients are exactly zero",
            "The network died (often after a too-large step knocked its units off): lower the learning rate and "
            "restart from an earlier checkpoint or a fresh initialisation; use LeakyReLU/GELU, normalization layers, "
            "gradient clipping.",
            "AutoTrainer (ICSE'21): dying ReLU as >= 70% of gradient entries exactly zero; CS231n",
        ),
        _rule(
            "loss_at_chance",
            "warning",
            "The loss stays at chance level",
            "The model predicts no better than chance: check that inputs and labels stay paired (shuffled together), "
            "that the labels are right, and that the data reaches the model.",
            '"37 reasons": expected loss at chance -ln(1/C); check that the inputs are connected to the outputs',
        ),
        _rule(
            "shape_mismatch",
            "critical",
            "The output's shape differs from the target's",
            "Squeeze the output or unsqueeze the targets so both have the same shape (e.g. (N,) or (N, 1)): the loss "
            "broadcasts them to (N, N) and learns the mean.",
            'PyTorch\'s warning "Using a target size that is different to the input size"; "37 reasons"',
        ),
        _rule(
            "gradients_not_zeroed",
            "critical",
            "Gradients are not zeroed between steps",
            "Call optimizer.zero_grad() every step (before backward).",
            '"37 reasons"; PyTorch docs on zero_grad',
        ),
        _rule(
            "overfitting",
            "warning",
            "Overfitting",
            "Stop early (the best checkpoint is named in the message); add regularization or data.",
            "Early-stopping guides; UMLAUT (CHI'21)",
        ),
        # Preflight-only checks (client_hook.preflight): run once before training.
        _rule(
            "overfit_one_batch_failed",
            "warning",
            "Cannot overfit one batch",
            "The model/loss wiring cannot learn: check the loss inputs, the output layer, detached tensors and the "
            "learning rate.",
            'Karpathy, "A Recipe for Training Neural Networks": overfit one batch',
        ),
        _rule(
            "no_gradient",
            "critical",
            "Parameters get no gradient",
            "Look for a .detach(), .item() or numpy round-trip in forward, or a branch that is never used.",
            '"37 reasons": check that every weight gets a gradient',
        ),
        _rule(
            "batch_mixing",
            "critical",
            "Samples are mixed across the batch",
            "Look for a view/reshape/transpose that moves data between samples (e.g. .view(-1, ...) on a "
            "(seq, batch, ...) tensor).",
            'Karpathy, "A Recipe for Training Neural Networks": use backprop to chart dependencies',
        ),
        _rule(
            "softmax_before_loss",
            "warning",
            "Probabilities fed to a loss that expects logits",
            "Remove the final softmax/log_softmax: CrossEntropyLoss applies log_softmax itself.",
            '"37 reasons": double softmax',
        ),
    )
}
