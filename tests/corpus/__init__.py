"""A differential test corpus: model families and the route checks
(``tests/test_corpus.py``, ``tests/test_corpus_generated.py``)."""
