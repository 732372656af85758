"""The CPU side of docqa's Ray Data plan, as Ray runs it: ``read_datasource(DocumentListing)`` lists the
documents; one ``map_batches(DocumentPages)`` task per document reads, rasterizes (in the render helper)
and splits it; the actor pool (actors/predictor.py) answers; the driver's ``RunWriter`` commits the rows to the
output's Delta tables (pipeline/tables.py)."""
