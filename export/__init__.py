"""Export PyTorch recurrent models as step functions ``(x_t, *state) -> (y_t, *state')`` to ONNX or TorchScript.

    from rnnserve.export import adapt, export

    exportable = adapt(nn.LSTM(8, 16, num_layers=2, batch_first=True), head=nn.Linear(16, 4))
    outputs, final_states = exportable.reference(torch.randn(3, 50, 8))  # (3, 50, 4): the eager oracle
    folder = export(exportable, name="lstm", repository="model_repository", format="onnx")

Every export is verified against the eager reference before ``REPO/NAME/VERSION/`` appears.
"""

from rnnserve.export.adapters import adapt
from rnnserve.export.api import FORMATS, export, export_examples
from rnnserve.export.errors import ExportError, ExportVerificationError
from rnnserve.export.sequence import SequenceExportable, adapt_sequence
from rnnserve.export.step import Exportable, Reference, StateInfo, TensorInfo

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportVerificationError",
    "Exportable",
    "Reference",
    "SequenceExportable",
    "StateInfo",
    "TensorInfo",
    "adapt",
    "adapt_sequence",
    "export",
    "export_examples",
]
