"""pdserve: LLM serving with prefill/decode disaggregation.

The offline API mirrors vLLM's: `from pdserve import LLM, SamplingParams`. Importing the
package stays light; the engine (and torch) load on first use of `LLM`.
"""

import os
from typing import TYPE_CHECKING

# OpenMP threads that busy-wait after each torch op steal the cores OpenBLAS and the
# attention kernel need a moment later (measured: a batch-32 decode step 160 ms -> 60 ms,
# prefill 2260 -> 2380 tok/s with passive waiting). It must be set before torch loads
# OpenMP, i.e. before torch is imported; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Likewise OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after a product: a prompt
# prefilled on torch's threads right after single-row decode products (OpenBLAS) ran at
# half speed (256 tokens: 150 ms instead of 78). 2^20 cycles (~0.4 ms) keeps them warm
# between the products of one step (batch-1 decode unchanged, 8.7 ms). Read when numpy
# loads OpenBLAS, so also before numpy is imported.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from pdserve.outputs import CompletionOutput, RequestOutput
from pdserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from pdserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
