"""Where screens and outputs live: stores and fsspec URLs, opening screens lazily, conversion, integrity, exports."""
