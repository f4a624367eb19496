"""Merging pre-trained models: seeds read lazily (`seeds`), the merge written out (`output`)."""
