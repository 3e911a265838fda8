"""edgeforge's shared library: everything two targets need lives here."""
