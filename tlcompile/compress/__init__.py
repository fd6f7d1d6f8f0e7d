"""Compression that pays on the device: structured pruning, NNCF pruning and quantization, distillation, a guard.

- :mod:`~tlcompile.compress.calibration`: the stratified calibration set drawn from the training split.
- :mod:`~tlcompile.compress.prune`: structured channel pruning with torch-pruning (channels physically removed, the
  pruned architecture saved as a JSON channel plan beside the state_dict); NNCF unstructured magnitude pruning.
- :mod:`~tlcompile.compress.quantize`: BatchNorm folding, NNCF INT8 post-training quantization as the start,
  quantization-aware training, per-layer sensitivity and FP32 fallback through NNCF's ignored scope; saved as
  NNCF config + state_dict and rebuilt with ``nncf.torch.load_from_config``.
- :mod:`~tlcompile.compress.distill`: knowledge distillation from the FP32 model (KL on softened logits + CE).
- :mod:`~tlcompile.compress.guard`: the accuracy guard, an AUC / accuracy drop on val against a reference model.
- :mod:`~tlcompile.compress.realign`: shifting a model's referable log-odds back onto the locked operating point.

The build's stages that use these (``03_prune``, ``04_quantize``) live in :mod:`tlcompile.build.stages`.

This package is in the training half (torch, torch-pruning, nncf); heavy imports happen inside functions where
they are optional, and a missing one names the extra to install.
"""
