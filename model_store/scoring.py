"""What turns a checkpoint's logits into its scores, decided as transformers' text-classification
pipeline decides it (`TextClassificationPipeline.postprocess`, `function_to_apply` left at its default):

- `problem_type` regression: the raw value (`none`);
- multi-label classification, or a head of one output: each label's sigmoid;
- single-label classification, or several outputs: the softmax over the labels.

The function is part of what a model is: config.json says it, and the model's version (a fingerprint
of every checkpoint file, config.json included) changes with it, so cached scores never outlive it.
So does `SCORES_GENERATION`, what the service makes of a checkpoint's logits: bump it whenever the
same checkpoint's scores change meaning, and every model's version, so every cache key, changes.
"""

from __future__ import annotations

import numpy as np
from transformers import PretrainedConfig

from core.protocol import ScoreFunction

SCORES_GENERATION = 2  # the checkpoint's own function on the engine's logits (`default_function`, `apply`)


def default_function(config: PretrainedConfig) -> ScoreFunction:
    """The function the pipeline applies to this checkpoint's logits when none is asked for."""
    if config.problem_type == "regression":
        return ScoreFunction.NONE
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return ScoreFunction.SIGMOID
    return ScoreFunction.SOFTMAX


def apply(function: ScoreFunction | str, logits: np.ndarray) -> np.ndarray:
    """Scores, (texts, labels) float32, from logits of the same shape, as the pipeline computes them."""
    logits = np.asarray(logits, dtype=np.float32)
    if function == ScoreFunction.SOFTMAX:
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    if function == ScoreFunction.SIGMOID:
        with np.errstate(over="ignore"):  # a logit below about -88: exp overflows, and the score is 0.0
            return 1.0 / (1.0 + np.exp(-logits))
    if function == ScoreFunction.NONE:
        return logits
    raise ValueError(f"no score function {function!r}: {', '.join(ScoreFunction)}")
