"""The engine moves tensors: optimizer state between host and device, master weights, (later)
streamed units. Methods decide *what* trains; the engine carries out *where* things live."""
