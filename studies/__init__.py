"""Studies: grids of models x corpora x measures (perplexity per quantization method and threshold, the
outlier-feature scan, ...), resumable in SQLite, with reports in the layouts of Dettmers et al. 2022,
"LLM.int8()" (arXiv 2208.07339).

``config`` (the TOML study; ``settings``: its keys), ``measures`` (the registry: one module per measure),
``planning`` (the grid, cell identities, states), ``worker`` and ``ray_backend`` (computing cells),
``runner`` (``run_study``), ``store`` (``results.sqlite``), ``report`` and ``format`` (tables, figures,
``report.md``), ``cli`` (the ``studies`` command).
"""
