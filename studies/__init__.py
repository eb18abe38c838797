"""Study runner: threshold ablations, method tables and model-scale studies,
resumable in SQLite. Filled in by the studies issue."""
