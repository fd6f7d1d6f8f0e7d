"""Names vulture (make lint) cannot see used, each with the reason it is not dead code.

vulture reads ``paths`` in pyproject.toml's [tool.vulture], this file included: a name written here counts as used.
"""

from tlcompile import compat, recipe
from tlcompile.data import checks, degrade, synthetic
from tlcompile.models import zoo
from tlcompile.report import quality as report_quality
from tlcompile.runtime import bundle, fhir, inference, predict, preprocess, terminal

# Dataclass fields written to JSON with dataclasses.asdict (data_check.json, verify / predict records).
checks.DataReport.label_csv
checks.DataReport.images_folder
bundle.Reading.referable_dr
bundle.GoldenCheck.max_abs_probability_diff
predict.ImageResult.referable_dr
predict.ImageResult.latency_ms

# Recipe fields read by name: the guard's limits (guard.limits_of: getattr(cfg, f"max_{metric}_drop")) and the
# endpoints (EvaluateConfig.endpoints.model_dump() into evaluate.clinical).
recipe.GuardLimits.max_auc_drop
recipe.GuardLimits.max_sensitivity_drop
recipe.GuardLimits.max_specificity_drop
recipe.GuardLimits.max_accuracy_drop
recipe.EndpointsConfig.min_sensitivity
recipe.EndpointsConfig.min_specificity
recipe.EndpointsConfig.min_auc

# ONNX Runtime's SessionOptions (runtime/inference.py): set here, read by onnxruntime.
_ = inference
_.intra_op_num_threads
_.inter_op_num_threads
_.graph_optimization_level
_.log_severity_level

# openvino-telemetry's singleton (compat.decline_vendor_telemetry): set here, read by the library before a send.
_ = compat
_.consent

# Public helpers the package offers beside the ones it calls itself (each has its own tests).
synthetic.sample_grades  # the generator's grades without rendering a single image
preprocess.find_fov  # the field-of-view box prepare_image crops to
terminal.fit_table  # FitTable from header + rows in one call
zoo.TorchvisionModel.torchvision_name  # which torchvision builder a zoo model wraps

# The one-photo form of prepare_photo + decide: the library's entry point for a single image (tests compare serve's
# records against it); predict and serve run the two halves in a pipeline.
predict.predict_image
predict.ImageResult.explanation  # predict --explain / serve --explain: the heatmap PNG, read through asdict()

# The quality gate: recipe limits read with model_dump() (build/stages/quality.py), ImageResult fields written by
# asdict (CSV, serve records), and report.json's quality section, typed for the schema only (report/schema.py).
recipe.QualityLimits.brightness
predict.ImageResult.quality_score
predict.ImageResult.quality_reasons
report_quality.QualitySection
report_quality.GateMetrics.specificity
report_quality._Calibration.gradable_used
report_quality._Calibration.share_passing
report_quality._Calibration.gate_on_val
report_quality._SensSpec.specificity
report_quality._Referral.all_images
report_quality._Referral.gradable_only
report_quality._Referral.share_graded
report_quality.QualitySection.limits_source
report_quality.QualitySection.calibration
report_quality.QualitySection.ms_per_photo
report_quality._Calibration.photos
report_quality._Calibration.photos_in_split
report_quality._TestPhotos.in_split
report_quality.QualitySection.test_photos
report_quality.QualitySection.referral_by_artifact
report_quality.QualitySection.referral_headline
report_quality.QualitySection.photos_as_taken
report_quality.QualitySection.max_green_median
report_quality.QualitySection.min_brightness
report_quality.QualitySection.min_green_median

# data/degrade.py: the in-memory form of stream_copies, for a few photos (tests; the build and `data synth` stream).
degrade.degraded_copies

# runtime/fhir.py: urllib's redirect handler calls it (returning None leaves the 3xx to _post)
fhir._NoRedirect.redirect_request
