"""Instruments: peak memory, this machine's roofline, the quadratic-wall sweep."""
