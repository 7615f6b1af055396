"""monet_fast.data: typed samples, the Monet-SFT reader/writer, image resizing, synthetic task."""

from monet_fast.data.batching import collate
from monet_fast.data.images import open_rgb, resize_by_token_budget
from monet_fast.data.reader import (
    DataError,
    DataWarning,
    ReadReport,
    read_monet_sft,
    read_monet_sft_with_report,
    validate,
    validate_sample,
    write_monet_sft,
)
from monet_fast.data.synthetic import (
    SyntheticTaskConfig,
    make_sample,
    make_samples,
    write_synthetic_dataset,
)
from monet_fast.data.types import DEFAULT_SYSTEM, SEGMENT_KINDS, Sample, Segment

__all__ = [
    "DEFAULT_SYSTEM",
    "SEGMENT_KINDS",
    "DataError",
    "DataWarning",
    "ReadReport",
    "Sample",
    "Segment",
    "SyntheticTaskConfig",
    "collate",
    "make_sample",
    "make_samples",
    "open_rgb",
    "read_monet_sft",
    "read_monet_sft_with_report",
    "resize_by_token_budget",
    "validate",
    "validate_sample",
    "write_monet_sft",
    "write_synthetic_dataset",
]
