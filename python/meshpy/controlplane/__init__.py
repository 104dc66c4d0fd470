"""The control plane: mesh resources, their store, the REST API, the CA, the watch stream."""
