"""Stage 5, the numbers: perplexity one recorded way, agreement with a reference, intervals.

``windows``     protocols (chunks, sliding), BOS handling, batching of windows
``perplexity``  ``perplexity(model, ids, reference=...)``
``result``      ``PerplexityResult``: the number, its settings, per-window sums, agreement
``lmhead``      final hidden states and logits a few positions at a time
``intervals``   bootstrap intervals over windows
``agreement``   KLD percentiles and Δp as llama.cpp's ``perplexity --kl-divergence`` reports them
``noise_floor`` the float model cast to bfloat16 against itself: the arithmetic's own noise, cached
"""
