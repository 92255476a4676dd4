"""Encoders for what stages write: PNG images and grids, Parquet bytes, JSON-safe values, redacted settings.

One of each, so that every figure, table and document the run writes is encoded the same way.
"""

from __future__ import annotations

import io
import math
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
from PIL import Image

from reid_batch import __version__

if TYPE_CHECKING:  # torch stays unimported here: `report` renders without it
    import pyarrow as pa
    from torch import Tensor


def png_bytes(image01: Tensor) -> bytes:
    """An 8-bit PNG of one [0, 1] image (C, H, W), C = 1 (grey) or 3 (RGB)."""
    array = (image01.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    picture = Image.fromarray(array[0], mode="L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0), mode="RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def png_files_job(images01: Tensor, keys: list[str], write: Callable[[str, bytes], None]) -> Callable[[], None]:
    """A job that writes each image of a batch as an 8-bit PNG under its key, for a BackgroundWriter.

    Encoding on the calling (GPU-feeding) thread cost a device-to-host copy per image, each a wait for the GPU, and
    the PNG compression itself. Here only the copy of the whole batch is started: on CUDA into pinned host memory
    without waiting (non_blocking), with an event that the job waits on in the writer's thread, so the loop goes on
    to the next batch at once. The caller must not modify `images01` in place afterwards (nothing in reid-batch
    does: every batch is a new tensor)."""
    import torch

    images = images01.detach()
    ready = None
    if images.is_cuda:
        images = images.to("cpu", non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()

    def job() -> None:
        if ready is not None:
            ready.synchronize()
        for key, image in zip(keys, images):
            write(key, png_bytes(image))

    return job


def grid_png(images01: Tensor, side: int) -> bytes:
    """A side x side grid of [0, 1] images with 2-pixel white gutters, as PNG (grey or RGB as the images)."""
    n, channels, h, w = images01.shape
    pad = 2
    canvas = images01.new_ones(channels, side * (h + pad) + pad, side * (w + pad) + pad)
    for i in range(min(n, side * side)):
        r, c = divmod(i, side)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images01[i]
    pixels = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def parquet_bytes(rows: list[dict] | pd.DataFrame | pa.Table) -> bytes:
    """A Parquet file of a table (an Arrow table, a DataFrame, or rows as dicts), as bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pandas(
        rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows), preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def clean_json(value):
    """JSON-safe copy: NaN/inf and missing (pd.NA) -> None, numpy scalars -> Python, tuples -> lists (strict JSON
    readers). The one cleaner of every JSON document the run writes."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return clean_json(value.item())
    return value


def figure_png(figure, **savefig) -> bytes:
    """A matplotlib Figure as PNG bytes (`savefig` options such as dpi pass through)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **savefig)
    return buffer.getvalue()


def grey_uint8(image01: Tensor) -> np.ndarray:
    """One [0, 1] image (C, H, W) as 8-bit grey levels (H, W); colour averaged over channels."""
    grey = image01.mean(dim=0) if image01.shape[0] > 1 else image01[0]
    return (grey.clamp(0, 1) * 255).round().byte().cpu().numpy()


def pair_png(reconstruction01: Tensor, neighbour01: Tensor, gap: int = 2) -> bytes:
    """Reconstruction | nearest training image, side by side (grey, 8-bit), white gap between."""
    left, right = grey_uint8(reconstruction01), grey_uint8(neighbour01)
    canvas = np.full((left.shape[0], left.shape[1] + gap + right.shape[1]), 255, dtype=np.uint8)
    canvas[:, :left.shape[1]] = left
    canvas[:, left.shape[1] + gap:] = right
    buffer = io.BytesIO()
    Image.fromarray(canvas, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def software_versions() -> dict:
    """Versions of what computed and rendered the numbers (importlib.metadata: nothing heavy is imported)."""
    found = {"python": platform.python_version(), "reid-batch": __version__}
    for package in ("torch", "torchvision", "pyarrow", "numpy", "pandas", "scikit-learn", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def feature_column(features: np.ndarray):
    """An Arrow fixed-size-list column of (N, D) float32 features; feature_matrix reads it back."""
    import pyarrow as pa

    values = np.ascontiguousarray(features, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def feature_matrix(column) -> np.ndarray:
    """(N, D) float32 of an Arrow fixed-size-list column of features (records.parquet, leak_candidates.parquet)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
