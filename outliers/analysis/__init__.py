"""Stage 3, the phenomena: statistics of hidden states by forward hooks, and what they show.

``points``       capture points, found through the architecture registry
``hooks``        ``capture``: hooks in a context manager that always removes them
``stats``        ``OutlierStats``: bounded-memory statistics per (point, dim), merge, save, load
``fields``       the statistics' names (enums), dtypes and histogram bins
``cpu_kernels``  the fused one-pass statistics kernel (CPU)
``torch_stats``  the same statistics in torch: any device, the kernel's reference
``scan``         a corpus through the model under ``capture``
``criteria``     the paper's criteria, a scale-relative one, massive activations
``moments``      kurtosis and ∞-norm per point, per block and per model (Bondarenko et al. 2023)
``ablate``       zeroing dims, and what it does to perplexity and attention
``sinks``        attention sinks: each head's mean attention to the first token, first-token norms
``superweights`` super weights: down-projection spikes per block, the weights behind them, ``zeroed``
``superweight_effects``  perplexity with super weights zeroed, their activation restored, the controls
``superweight_controls`` which weights each control zeroes (matched, paper, outside_massive, largest_down)
``superweight_verdicts`` the controls' perplexities and the effect-based verdict: super_weight or spike
``lifecycle``    the outlier lifecycle: super weight -> massive activation -> sinks -> key channels -> KL, by
                 causal edits (``lifecycle_edits``) with paired intervals; ``lifecycle_plots`` its diagram
``weights``      weight outliers per linear: max |w|, kurtosis, beyond 6σ, int8 reconstruction errors
``kvcache``      key and value channels as projected and as cached (after RoPE and key norms); ``kvcache_capture``
                 its hooks and cache reading, ``kvcache_plots`` its figures
``range``        number-format headroom: max |x| against float16/bfloat16, FP8 underflow, an emulated float16 run
``tokens``       outlier tokens: which tokens carry massive activations, where, in which blocks, how reliably
``plots``        seaborn figures of the above
"""
