"""bezoar-jobs: the OpenBezoar instruction-tuning recipe as Kubernetes-native stage jobs."""

__version__ = "0.1.0"
