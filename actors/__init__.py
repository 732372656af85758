"""Model actors of docqa: the Idefics2 predictor run in a Ray Data actor pool."""
