"""The Ray side of shardrec: clusters, launching ranks, and Ray Data jobs.

Ray reads its authentication mode once, when it is imported, so it is settled here, before any
module of this package imports Ray: token authentication, unless the user set RAY_AUTH_MODE
themselves. Loopback-only runs also need RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, or Ray binds the
machine's external address and clients can hang without an error.
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
