"""Where backends and cache-pool peers come from when they are not listed statically: ``kubernetes``
(EndpointSlices).  Below the gateway and the cache node, which start it; apart from the Kubernetes operator
(``kvmesh.k8s``), which only writes the objects it reads."""
