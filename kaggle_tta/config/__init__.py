"""The pipeline.yaml schema and its loader.

Every model forbids unknown keys, so a typo is an error naming its YAML path rather than a
silently ignored setting. Resolution order for any value: ``--set`` override > YAML >
timm's ``pretrained_cfg`` for the member's architecture > the default written here.

- ``marks``: which fields name files (``Bundle``) and which factory kwargs are paths;
- ``data``: the test set, the classes and the ground truth;
- ``section_base``: the base model of every section and the field checks they share;
- ``sections``: runtime, cache, members, blends, submission;
- ``task_sections``: tiling and the task settings (segmentation, detection, RLE);
- ``pipeline``: the whole pipeline, its task defaults and graph checks;
- ``loading``: ``load_pipeline`` (a path or a dict, with overrides) and ``load_classes``;
- ``yaml_files``: reading YAML files safely, every failure one ConfigError line.
"""

from kaggle_tta.config.data import BoxesSpec, CsvSource, DataConfig, LabelsSpec, MasksSpec
from kaggle_tta.config.loading import apply_override, format_validation_error, load_classes, load_pipeline
from kaggle_tta.config.marks import FACTORY_PATH_KWARGS, Bundle, bundled_fields
from kaggle_tta.config.pipeline import PipelineConfig
from kaggle_tta.config.sections import (
    BlendConfig,
    CacheConfig,
    MemberConfig,
    PreprocessConfig,
    RuntimeConfig,
    SubmissionConfig,
)
from kaggle_tta.config.task_sections import (
    DetectionConfig,
    RegressionConfig,
    RLEConfig,
    SegmentationConfig,
    TilingConfig,
)

__all__ = [
    "FACTORY_PATH_KWARGS",
    "BlendConfig",
    "BoxesSpec",
    "Bundle",
    "CacheConfig",
    "CsvSource",
    "DataConfig",
    "DetectionConfig",
    "RegressionConfig",
    "LabelsSpec",
    "MasksSpec",
    "MemberConfig",
    "PipelineConfig",
    "PreprocessConfig",
    "RLEConfig",
    "RuntimeConfig",
    "SegmentationConfig",
    "SubmissionConfig",
    "TilingConfig",
    "apply_override",
    "bundled_fields",
    "format_validation_error",
    "load_classes",
    "load_pipeline",
]
