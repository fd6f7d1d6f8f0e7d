"""Safe checkpoint loading and atomic saving (training half).

A checkpoint is tensors and plain Python values: a state_dict (``.pt``/``.pth`` via ``torch.save``) or a
safetensors file. ``torch.load`` always runs with ``weights_only=True``: a pickle that carries code (a crafted
``__reduce__``) is refused with :class:`UnsafeFileError` and is never retried with unsafe loading.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from tlcompile.errors import ModelError, UnsafeFileError
from tlcompile.io import atomic_write_with


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a state_dict-like object from ``.safetensors`` or a ``torch.save`` file, safely, onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ModelError(
                f"{path}: reading .safetensors needs the 'safetensors' package (pip install safetensors)"
            ) from err
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises SafetensorError / OSError for corrupt headers
            raise ModelError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from err
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol N" noise from hand-made pickles
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refused what the file asks for: a global it does not allow (code to run or objects to build),
        # or opcodes outside plain tensor pickles (a hand-made pickle, or bytes that are not a checkpoint at all).
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "unknown")
        raise UnsafeFileError(
            f"{path}: refused: not a plain state_dict ({reason[:200]}); "
            "tlcompile loads state_dicts and safetensors only and never unpickles code"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ModelError(f"{path}: not a readable torch checkpoint ({str(err).splitlines()[0][:200]})") from err
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds a {type(state).__name__}, not a state_dict (a mapping of names to tensors)")
    return state


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` under a temporary name, then rename: a crash mid-write leaves the previous file intact.

    Written through a file object: ``torch.save(state, path)`` names the zip's inner folder after the (random)
    temporary file name, so identical weights would give different bytes and a sha256 would not pin them.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write_with(Path(path), write)
