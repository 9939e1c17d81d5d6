"""The agent: composes retrieval and VLM questions into a located photo."""
