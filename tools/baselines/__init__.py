"""What ``ts-bench`` compares the project's archives with: stock-style TorchServe handlers and a LitServe app.

They are written the way TorchServe's and LitServe's own examples are, on the same weights
and the same input conversion, so the comparison measures serving, not model code.
"""
