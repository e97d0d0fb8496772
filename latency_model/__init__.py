"""Step-latency prediction: features shared by training and serving, an XGBoost quantile model."""
