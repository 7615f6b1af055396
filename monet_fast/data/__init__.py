"""monet_fast.data: typed samples, the Monet-SFT reader/writer, image checks and resizing, dataset
root checks, synthetic task. Data errors are `DataError` (a ValueError) naming file, row, field."""

from monet_fast.data.batching import collate
from monet_fast.data.images import decode_rgb, open_rgb, pixel_limit, resize_by_token_budget
from monet_fast.data.latent_batch import LatentBatch
from monet_fast.data.paths import resolve_image_path
from monet_fast.data.reader import (
    DataError,
    DataWarning,
    ReadReport,
    read_monet_sft,
    read_monet_sft_with_report,
)
from monet_fast.data.synthetic import (
    SyntheticTaskConfig,
    make_sample,
    make_samples,
    write_synthetic_dataset,
)
from monet_fast.data.types import DEFAULT_SYSTEM, SEGMENT_KINDS, Sample, Segment
from monet_fast.data.validation import validate, validate_sample
from monet_fast.data.writer import write_monet_sft

__all__ = [
    "DEFAULT_SYSTEM",
    "SEGMENT_KINDS",
    "DataError",
    "DataWarning",
    "LatentBatch",
    "ReadReport",
    "Sample",
    "Segment",
    "SyntheticTaskConfig",
    "collate",
    "decode_rgb",
    "make_sample",
    "make_samples",
    "open_rgb",
    "pixel_limit",
    "read_monet_sft",
    "read_monet_sft_with_report",
    "resize_by_token_budget",
    "resolve_image_path",
    "validate",
    "validate_sample",
    "write_monet_sft",
    "write_synthetic_dataset",
]
