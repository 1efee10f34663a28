"""Text <-> token ids without torch or transformers: `Tokenizer` and `IncrementalDetokenizer`."""

from pdserve.tokenizer.detokenizer import IncrementalDetokenizer
from pdserve.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
