"""HOT: the numba kernels every decode token runs (records.py, matrix.py) and the LLVM vector pieces they are
built from (vecdot.py). Imports nothing from the runtime, the models or measurement."""
from .matrix import QuantMatrix
from .records import AHEAD, SMALL_T, U, RecordKernel, quantize_x, quantize_rows, warm_up

__all__ = ["AHEAD", "SMALL_T", "U", "QuantMatrix", "RecordKernel", "quantize_x", "quantize_rows", "warm_up"]
