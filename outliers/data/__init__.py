"""Stage 2, the text: corpora by name or path, their SHA-256, and their cached token ids.

``corpus``          ``load_corpus``, ``encode_corpus``, ``bos_token_id``
``builtin.txt.gz``  the built-in corpus (source and licence in ``BUILTIN_CORPUS.md``)
"""
