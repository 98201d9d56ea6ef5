"""Leaf helpers: errors, option ranges, interrupts, lazy imports, memory, safe output folders. No surgery imports."""
