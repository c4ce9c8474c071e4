"""Evaluation metrics: the FID Inception-v3 network (`inception`), FID (`fid`) and the modules
built on their features; each module documents its metric."""
