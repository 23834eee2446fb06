"""The torch-free base every floor stands on: config sections, errors, file readers, the dataset
format and its readers, negative sampling and per-user item lists. Imports no other shardrec package."""
