"""Tools for development, tests, benchmarks and the demo, not for production runs: sample documents
(``samples``) and tiny offline models with random weights built from the real transformers classes
(``tiny_models``, behind `docqa model tiny`)."""
