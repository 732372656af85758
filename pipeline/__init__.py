"""The CPU side of docqa's Ray Data plan, as Ray runs it: ``read_datasource(DocumentListing)`` lists the
documents, one task per listing shard (a subfolder or subprefix); one ``map_batches(DocumentUnits)`` task per
shard's block reads its documents and plans their page ranges; one
``map_batches(UnitPages)`` task per range rasterizes (in the render helper) and splits its pages, handing
them on in bounded blocks (pipeline/document_pages.py); the actor pool (actors/predictor.py) answers; the
driver's ``RunWriter`` commits the rows to the output's Delta tables (pipeline/tables.py)."""
