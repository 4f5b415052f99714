"""The same API served by Ray Serve replicas: `python -m embedding_api.ray_serve`.

`deployment.py` is the replica (the app of `create_app` behind `@serve.ingress`, one model copy per
device it is given, batching as the plain server does); `__main__.py` starts or joins Ray, deploys
the replicas with autoscaling and serves them on HOST:PORT until SIGTERM/SIGINT. Ray is imported by
these modules only: the plain server never needs it.
"""
