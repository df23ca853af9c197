"""Mosaic TPU Pallas kernels: recurrent/decode (`recurrent`), chunked forward and backward."""
