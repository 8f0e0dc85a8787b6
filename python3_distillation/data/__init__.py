"""Text → token shards on disk → fixed blocks read back a batch at a time.

    gpt2-distill prepare-data --config teacher          # tokenize ahead of training, print the manifest

Memory stays bounded whatever the corpus size. Design notes: docs/design/data.md.
"""

from python3_distillation.data.blocks import Blocks, MixedBlocks, TokenBlocks, batch_indices
from python3_distillation.data.documents import iter_local, split_documents
from python3_distillation.data.shards import CACHE_VERSION, load_blocks, prepare_tokens
from python3_distillation.data.sources import held_out, stream_source
from python3_distillation.data.tokenizing import tokenize_piece, tokenizer_fingerprint
from python3_distillation.errors import DataError

__all__ = ["Blocks", "CACHE_VERSION", "DataError", "MixedBlocks", "TokenBlocks", "batch_indices", "held_out",
           "iter_local", "load_blocks", "prepare_tokens", "split_documents", "stream_source", "tokenize_piece",
           "tokenizer_fingerprint"]
