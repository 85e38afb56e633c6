"""A tiny 'release' for the quick start: prints where it runs from and a computed value."""

import sys

print(f"hello from the repository, Python {sys.version.split()[0]}")
print("sum of squares 1..100 =", sum(i * i for i in range(1, 101)))
