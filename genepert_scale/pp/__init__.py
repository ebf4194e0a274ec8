"""The streamed pass: block kernels, graph building, HVG selection, labels, pseudo-bulk, DE."""
