"""The model side of docqa: the answering stage (answering.py, run by the actor pool and by the Serve
deployment, serving.py), and one adapter per model family (Idefics2, Idefics1) behind one interface
(adapters.py, with the continuous-batching decoder and the grammars of typed answers). The families as data
(catalog.py) and what the driver learns of a checkpoint (checkpoint.py) import neither torch nor
transformers."""
