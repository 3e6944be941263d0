"""The reference models of the tutorial notebooks, corrected, as exporter factories.

``EXAMPLES`` maps each model-repository name to its factory (no arguments, fixed seed, returns an
``rnnserve.export.Exportable`` whose ``model`` is the notebook model). ``SEQUENCE_EXAMPLES`` holds the
whole-sequence models (served by Predict, not sessions), whose factories return a ``SequenceExportable``.
Needs torch.
"""

from collections.abc import Callable

from rnnserve.examples.models import (
    bilstm_classifier,
    elman_relu,
    elman_tanh,
    gru2,
    lstm_proj_classifier,
    rnn_regressor,
    wuv_cell,
)
from rnnserve.export import Exportable
from rnnserve.export.sequence import SequenceExportable

EXAMPLES: dict[str, Callable[[], Exportable]] = {
    "elman_tanh": elman_tanh,
    "elman_relu": elman_relu,
    "wuv_cell": wuv_cell,
    "rnn_regressor": rnn_regressor,
    "lstm_proj_classifier": lstm_proj_classifier,
    "gru2": gru2,
}

SEQUENCE_EXAMPLES: dict[str, Callable[[], SequenceExportable]] = {
    "bilstm_classifier": bilstm_classifier,
}

__all__ = ["EXAMPLES", "SEQUENCE_EXAMPLES"]
