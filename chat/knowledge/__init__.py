"""Knowledge bases (issue 15, CONTRACT §8): the retrieval core.

- `text`: the lexical tokens BM25 indexes (words, and character bigrams
  for Chinese) and the chunker (by the embedding model's own tokenizer).
- `search`: a base's index (dense vectors and BM25, built once) and the
  hybrid search that fuses the two by reciprocal rank fusion.

Torch-free: the vectors come from the embedding engine (gpu_manager), or
from any callable that returns normalised vectors (the tests' embedder).
"""
