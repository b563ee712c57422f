"""The fastattrec version, importable without the package's lazy API."""

VERSION = "0.1.0"
