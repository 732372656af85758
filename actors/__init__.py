"""Model actors of docqa: one adapter per model family (Idefics2, Idefics1), run in a Ray Data actor pool."""
