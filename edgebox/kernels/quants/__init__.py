"""One module per GGML tensor type (what the type is for the kernels), and the table of them
(``registry``)."""
