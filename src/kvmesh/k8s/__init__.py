"""kvmesh on Kubernetes: the ``ModelService`` API (``api``), its CRD (``crd``), the objects one ModelService
becomes (``objects``), the install bundle (``install``), the pure reconcile (``reconcile``) and the thin
operator over the API server (``operator``).  Import from the defining modules."""
