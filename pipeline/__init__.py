"""Ray Data stages of docqa: list → read → rasterize → split → (actor) → rows → Parquet."""
