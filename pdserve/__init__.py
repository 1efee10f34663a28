"""pdserve: LLM serving with prefill/decode disaggregation.

The offline API mirrors vLLM's: `from pdserve import LLM, SamplingParams`. Importing the
package stays light; the engine (and torch) load on first use of `LLM`.
"""

from typing import TYPE_CHECKING

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
