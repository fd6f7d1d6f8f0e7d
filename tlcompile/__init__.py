"""tlcompile: edge-deployment model compiler for diabetic-retinopathy screening."""

__version__ = "0.1.0"
