"""Cross-stage knowledge: what each model family looks like.

``linear``    the linear kinds (nn.Linear, GPT-2's Conv1D), recognised in one function
``registry``  the ``Architecture`` record, the registry and lookups (``architecture_of``, ``blocks``)
``families``  the built-in families: Llama/SmolLM2, SmolLM3, OLMo 1/2, Mistral, Qwen 2/3, Gemma 1/2/3, GPT-2,
              OPT, GPT-NeoX/Pythia, BERT
``norms``     folding a per-channel scale into the norm that precedes a shared input
"""
