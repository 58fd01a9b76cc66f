"""The API answers over HTTP against the real stack."""


def test_health_reports_every_service_connected(api):
    response = api.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert body["data"]["status"] == "ok"
    assert body["data"]["services"] == {
        "database": "connected",
        "redis": "connected",
        "queue": "connected",
    }


def test_registered_user_can_read_me(user):
    response = user.get("/auth/me")
    assert response.status_code == 200
    assert response.json()["data"]["email"] == user.user["email"]
