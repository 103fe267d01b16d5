"""Retrieval service: text chunks with vectors, searched by vector, keyword or both."""
