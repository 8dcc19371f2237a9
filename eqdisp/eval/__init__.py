"""Evaluation: sampling into ADM sample batches, and FID, sFID, Inception Score, precision/recall.

- `generate` (``python -m cli.sample``): N samples of a run into an ADM ``.npz``, batched,
  sharded over all devices, resumable after a kill.
- `evaluate` (``python -m cli.evaluate``): the metrics of a sample batch against a reference, with
  the ADM evaluator's conventions; the metric functions themselves (`frechet_distance`,
  `inception_score`, `precision_recall`, `FeatureStats`) work on any feature arrays.
- Feature extractors: the bundled-digits classifier (**FID-classifier**, what the CPU experiments
  report; not comparable with FID-Inception) and Inception-v3 in Equinox (`InceptionV3FID`, `load_inception`: reads the standard FID weight file the user has; nothing is downloaded).
- `EvalError`: bad input; command-line tools print it as one line.
"""

from ._classifier import (
    CLASSIFIER_SETTINGS as CLASSIFIER_SETTINGS,
    DIGITS_TRAIN_SIZE as DIGITS_TRAIN_SIZE,
    DigitsClassifier as DigitsClassifier,
    DigitsFeatureExtractor as DigitsFeatureExtractor,
    classifier_path as classifier_path,
    digits_classifier_accuracy as digits_classifier_accuracy,
    digits_feature_extractor as digits_feature_extractor,
    load_digits_classifier as load_digits_classifier,
    train_digits_classifier as train_digits_classifier,
)
from ._evaluate import (
    DIGITS_REFERENCES as DIGITS_REFERENCES,
    ReferenceStats as ReferenceStats,
    evaluate as evaluate,
    format_report as format_report,
    reference_stats as reference_stats,
    resolve_extractor as resolve_extractor,
    write_report as write_report,
)
from ._features import (
    FeatureExtractor as FeatureExtractor,
    Features as Features,
    InceptionFeatureExtractor as InceptionFeatureExtractor,
    cache_dir as cache_dir,
    extract as extract,
)
from ._metrics import (
    FeatureStats as FeatureStats,
    fid_from_features as fid_from_features,
    frechet_distance as frechet_distance,
    inception_score as inception_score,
    manifold_radii as manifold_radii,
    precision_recall as precision_recall,
)
from ._npz import (
    EvalError as EvalError,
    iter_npz as iter_npz,
    npz_info as npz_info,
    npz_keys as npz_keys,
    read_npz as read_npz,
    write_npz as write_npz,
)
from ._sampling import Decoder as Decoder, generate as generate, partial_dir as partial_dir
from ._inception import (
    InceptionFeatures as InceptionFeatures,
    InceptionV3FID as InceptionV3FID,
    InceptionWeightsError as InceptionWeightsError,
    inception_features as inception_features,
    load_inception as load_inception,
    model_to_state_dict as model_to_state_dict,
    state_dict_to_model as state_dict_to_model,
)
