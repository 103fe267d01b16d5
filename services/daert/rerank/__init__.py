"""The rerank service (daert.v1.RerankService): order candidate documents for a query."""
