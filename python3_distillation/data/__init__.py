"""Text → token shards on disk → fixed blocks read back a batch at a time.

    gpt2-distill prepare-data --config teacher          # tokenize ahead of training, print the manifest

Memory stays bounded whatever the corpus size: documents are read as a stream (documents.py,
sources.py: local files, the embedded ``austen`` corpus or a streamed hub set), tokenized in pieces
(tokenizing.py), each followed by EOS and appended to one flat ``uint16``/``uint32`` file per split
(shards.py), and training reads just the rows of each batch (blocks.py).
"""

from python3_distillation.data.blocks import Blocks, MixedBlocks, TokenBlocks, batch_indices
from python3_distillation.data.documents import is_local_spec, iter_local, split_documents
from python3_distillation.data.shards import CACHE_VERSION, TokenShards, load_blocks, prepare_tokens, shard_key
from python3_distillation.data.sources import SPLITS, Plan, Source, held_out, local_source, plan_sources, stream_source
from python3_distillation.data.tokenizing import auto_num_proc, token_dtype, tokenize_piece, tokenizer_fingerprint
from python3_distillation.errors import DataError

__all__ = ["Blocks", "CACHE_VERSION", "DataError", "MixedBlocks", "Plan", "SPLITS", "Source", "TokenBlocks",
           "TokenShards", "auto_num_proc", "batch_indices", "held_out", "is_local_spec", "iter_local",
           "load_blocks", "local_source", "plan_sources", "prepare_tokens", "shard_key", "split_documents",
           "stream_source", "token_dtype", "tokenize_piece", "tokenizer_fingerprint"]
