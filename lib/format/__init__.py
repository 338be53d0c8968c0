"""Bytes in, bytes out: chunking, compression and the pack file format. No I/O policy, no SQL."""
