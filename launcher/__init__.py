"""The user-facing `shardrec` command line and its typed configuration. No torch.distributed here."""
