import meshpy


class RequireTenant(meshpy.Filter):
    """Refuse requests without a tenant header; tell the app which tenant is calling."""

    def __init__(self, header: str = "x-tenant"):
        self.header = header

    def on_request(self, req: meshpy.Request):
        tenant = req.headers.get(self.header)
        if tenant is None:
            return meshpy.Response(403, f"missing {self.header} header\n")
        req.headers["x-tenant-id"] = tenant.lower()

    def on_response(self, req: meshpy.Request, resp: meshpy.Response):
        resp.headers["x-checked-by"] = "meshpy"
