from tenant import RequireTenant

from meshpy import testing


def test_a_request_without_tenant_is_refused():
    result = testing.run(RequireTenant(), testing.request("GET", "/orders"))
    assert result.short_circuited
    assert result.response.status == 403


def test_the_app_gets_the_tenant_in_lower_case():
    req = testing.request("GET", "/orders", headers={"x-tenant": "ACME"})
    result = testing.run(RequireTenant(), req, response=testing.response(200))
    assert result.request.headers["x-tenant-id"] == "acme"
    assert result.response.headers["x-checked-by"] == "meshpy"
