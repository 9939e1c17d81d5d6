"""Retrieval: find candidate locations locally with open_clip and faiss. Knows nothing of VLMs."""
