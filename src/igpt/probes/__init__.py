"""Probes of a run's features: settings, the feature pass, logistic fits, low-data and attentive probes."""
