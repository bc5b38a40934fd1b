"""
Coverage-guided fuzz targets (atheris/libFuzzer) for the parts of popservice
that read bytes from the network or from files: the wire layer, the body
codec, the SASL mechanisms' decoders and the passwd-file parser.

Each module here is one target with ``TestOneInput(data: bytes) -> None``: it
raises (an ``AssertionError`` for a broken invariant, anything else for a
crash) only when the code under test misbehaves.  ``fuzz/run.py TARGET`` runs
atheris on it; ``tests/test_fuzz_slice.py`` feeds every target its seed
corpus (``fuzz/corpus/<target>/``) plus a fixed set of mutations, without
atheris, so CI is deterministic.
"""

#: The targets, by name: the module ``fuzz.<name>`` and the corpus ``fuzz/corpus/<name>/``.
TARGETS = ("line_reader", "command", "response", "body_decoder", "body_roundtrip", "sasl", "passwd_file")
