"""Loading checkpoints we did not write, without ever executing code from them.

A `.pt`/`.pth`/`.ckpt` file is a pickle, and unpickling can run arbitrary code. Target checkpoints come
from whoever asked for the audit, so they are untrusted: pickles are read only with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers. Our own outputs
are always safetensors, which cannot carry code at all.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from reid_batch import log
from reid_batch.errors import InputError

# Keys under which training scripts commonly nest the weights alongside optimizer state, epoch, etc.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Added to every key by DataParallel/DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_MAX_LISTED = 20


def _listing(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {shown}{more}" if items else ""


def _weights_only_reason(message: str) -> str:
    # torch surrounds the informative part (the blocked global) with advice to turn the safety check off
    # or allowlist the global, which we must not pass on.
    blocked = re.search(r"GLOBAL\s+([\w.]+)", message)
    if blocked:
        return f"it calls {blocked.group(1)}"
    operand = re.search(r"Unsupported operand (\d+)", message)
    if operand:
        return f"it uses pickle opcode {operand.group(1)}, which weights-only loading does not support"
    return "it holds an object type that weights-only loading does not allow"


def _read_file(path: Path) -> object:
    where = str(path)
    if not path.is_file():
        raise InputError("checkpoint file does not exist", where=where)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types for bad headers and short files
            raise InputError(f"not a readable safetensors file (truncated or corrupt?): {error}", where=where) from None
    try:
        with warnings.catch_warnings():
            # Plain pickle.dump files trigger a protocol warning that means nothing to the user.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch reports a disallowed global/opcode this way; a merely truncated pickle also lands here.
        if str(error).startswith("Weights only load failed"):
            raise InputError(
                "refused: this pickle holds more than plain tensors, so loading it would need the full "
                "unpickler, which would execute code from the file. Re-save just the weights "
                "(torch.save(model.state_dict(), path), or as .safetensors). "
                f"Reason: {_weights_only_reason(str(error))}",
                where=where,
            ) from None
        raise InputError(f"not a readable PyTorch checkpoint (truncated or corrupt?): {error}", where=where) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError) as error:
        raise InputError(f"not a readable PyTorch checkpoint (truncated or corrupt?): {error}", where=where) from None


def _unwrap(loaded: object, where: str) -> dict[str, torch.Tensor]:
    # Wrappers can nest (e.g. {"model": {"state_dict": ...}}), so peel until a flat name->tensor mapping remains.
    while isinstance(loaded, Mapping):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if wrapper is None:
            break
        log.event("checkpoint_unwrapped", file=where, key=wrapper)
        loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping):
        raise InputError(
            f"expected a state dict (a mapping of parameter names to tensors), found {type(loaded).__name__}",
            where=where,
        )
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InputError(
            f"expected a state dict of tensors, but {len(not_tensors)} entries are not tensors "
            f"(is the weights dict nested under a key other than {', '.join(WRAPPER_KEYS)}?):"
            + _listing(not_tensors),
            where=where,
        )
    if not loaded:
        raise InputError("the checkpoint holds no tensors", where=where)
    return dict(loaded)


def _strip_prefixes(state_dict: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    stripped: dict[str, torch.Tensor] = {}
    removed: set[str] = set()
    for key, tensor in state_dict.items():
        new_key = key
        while new_key.startswith(WRAPPER_PREFIXES):
            prefix = next(p for p in WRAPPER_PREFIXES if new_key.startswith(p))
            removed.add(prefix)
            new_key = new_key[len(prefix):]
        if new_key in stripped:
            raise InputError(f"two entries become '{new_key}' once wrapper prefixes are removed", where=where)
        stripped[new_key] = tensor
    if removed:
        log.event("checkpoint_prefixes_stripped", file=where, prefixes=sorted(removed))
    return stripped


def _check_finite(state_dict: dict[str, torch.Tensor], where: str) -> None:
    bad = [k for k, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise InputError(
            f"{len(bad)} weight tensors contain NaN or infinite values (a diverged or corrupted training run?), "
            f"first: {', '.join(bad[:5])}",
            where=where,
        )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an untrusted checkpoint into a flat {name: CPU tensor} dict, never executing code from it.

    Accepts `.safetensors`, or a torch.save file holding only tensors and plain containers; unwraps
    {"state_dict"|"model_state_dict"|"model": ...} and strips DataParallel/DDP `module.` and torch.compile
    `_orig_mod.` prefixes. Raises InputError for missing, corrupt, code-carrying or non-finite checkpoints.
    """
    path = Path(path)
    where = str(path)
    state_dict = _strip_prefixes(_unwrap(_read_file(path), where), where)
    _check_finite(state_dict, where)
    log.event("checkpoint_loaded", file=where, tensors=len(state_dict))
    return state_dict


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write weights as safetensors, atomically (a crash leaves the old file or none, never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (tied weights, views), so each gets its own copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def _is_optional(key: str) -> bool:
    # BatchNorm fills in a missing counter itself (checkpoints from before it existed lack it).
    return key.endswith("num_batches_tracked")


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    where: str,
    expected: str | None = None,
    hint: str | None = None,
) -> nn.Module:
    """Load `state_dict` into `model`, or raise InputError listing every key/shape mismatch.

    `expected` names the architecture the checkpoint was supposed to be (defaults to the model's class name),
    so the message tells the user which `arch` setting the checkpoint disagrees with; `hint`, if given, is
    appended to that message.
    """
    expected = expected or type(model).__name__
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state_dict and not _is_optional(k)]
    # BatchNorm counters say little about what the checkpoint is, so they go to the end of the listing.
    unexpected = sorted((k for k in state_dict if k not in wanted), key=_is_optional)
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(wanted[k].shape)}"
        for k in wanted
        if k in state_dict and tuple(state_dict[k].shape) != tuple(wanted[k].shape)
    ]
    # Integer or boolean values where the model has float weights would be cast silently: not a trained model.
    wrong_dtype = [
        f"{k}: checkpoint {state_dict[k].dtype} vs model {wanted[k].dtype}"
        for k in wanted
        if k in state_dict and wanted[k].is_floating_point() and not state_dict[k].is_floating_point()
    ]
    if missing or unexpected or mismatched or wrong_dtype:
        groups = [
            [f"missing from checkpoint: {k}" for k in missing],
            [f"not in {expected}: {k}" for k in unexpected],
            [f"shape mismatch {m}" for m in mismatched],
            [f"dtype mismatch {m}" for m in wrong_dtype],
        ]
        # Share the listing between kinds, so a long run of missing keys cannot hide the unexpected ones.
        per_group = max(1, _MAX_LISTED // sum(1 for g in groups if g))
        listed = "".join(_listing(g, per_group) for g in groups)
        raise InputError(
            f"checkpoint does not match the expected architecture '{expected}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape-mismatched, "
            f"{len(wrong_dtype)} dtype-mismatched keys); "
            "is `arch` (or the image size / ViT dimensions) set to what the model was trained with?"
            + listed
            + (f"\n{hint}" if hint else ""),
            where=where,
        )
    model.load_state_dict(dict(state_dict), strict=False)
    return model
