"""Workarounds that reach into private APIs of shardrec's dependencies, one module per
dependency (importing Ray where only torch is needed would cost seconds): what to check on an
upgrade. Nothing else in shardrec touches a private name of torch, TorchRec, FBGEMM or Ray
(tests/test_layering.py checks it)."""
