"""Training data: corpus, tokenizers, prepared token shards and deterministic sample addressing."""

from iota.data.corpus import Corpus, Document, kjv_path
from iota.data.plan import (
    DEFAULT_HELDOUT_FRACTION,
    DataIntegrityError,
    DataPlan,
    ShardInfo,
    TokenData,
    seeded_permutation,
    token_dtype,
)
from iota.data.prepare import Manifest, Prepared, load_prepared, prepare, prepare_command
from iota.data.tokenizer import BPETokenizer, Llama3Tokenizer, Tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_HELDOUT_FRACTION",
    "BPETokenizer",
    "Corpus",
    "DataIntegrityError",
    "DataPlan",
    "Document",
    "Llama3Tokenizer",
    "Manifest",
    "Prepared",
    "ShardInfo",
    "TokenData",
    "Tokenizer",
    "kjv_path",
    "load_prepared",
    "load_tokenizer",
    "prepare",
    "prepare_command",
    "seeded_permutation",
    "token_dtype",
]
