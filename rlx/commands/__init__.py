"""The commands other than ``rlx train``: argument handling and printing around the library's functions."""
