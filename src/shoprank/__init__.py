"""shoprank: keep an e-commerce search-ranking transformer fresh."""

__version__ = "0.1.0"
