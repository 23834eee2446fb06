"""The Ray side of shardrec: clusters, launching ranks, data preparation and Ray Data pipelines."""
