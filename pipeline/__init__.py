"""The CPU side of docqa's Ray Data plan, one module a stage, each handing on one record (pipeline/records.py):

    listing.py    DocumentListing  read_datasource: the input's documents, one task per listing shard
    planning.py   PlanDocuments    read each document, open it in the render helper, plan its page ranges
    rendering.py  RenderPages      render a range's pages in the helper and split them for the model
    (actors/answering.py AnswerPages: the actor pool answers)
    writing.py    RunWriter        on the driver: commit the answer rows to the Delta tables (tables.py)

What they share: the config (config.py, questions.py), the render helper (sandbox.py, its parent's side;
render_helper.py and pdf.py, the helper's), storage (storage.py), the run's ledger (ledger.py), the commit
protocol (commits.py), and the rules for pages, images, text layers and typed values."""
