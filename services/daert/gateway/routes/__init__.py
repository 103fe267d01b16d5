"""The gateway's HTTP routes, one module per part of the OpenAI API."""
