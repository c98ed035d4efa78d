"""Self-supervised pretraining: DINO's networks, loss and schedules, and the k-NN and linear-probe
evaluations that say whether the features are any good."""
from .dino import DINOHead, DINOLoss, DINOModel, MultiCrop, WeightNormLinear, cosine_ramp, teacher_temperature
from .knn import extract_features, knn_accuracy, knn_predict, linear_probe_accuracy

__all__ = ['DINOHead', 'DINOLoss', 'DINOModel', 'MultiCrop', 'WeightNormLinear', 'cosine_ramp', 'extract_features',
           'knn_accuracy', 'knn_predict', 'linear_probe_accuracy', 'teacher_temperature']
