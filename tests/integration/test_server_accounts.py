"""Accounts and devices against a real server process."""

from __future__ import annotations

from tests.api import Api, auth_key_for, b64


def test_signup_creates_home_space_and_device(api: Api):
    user = api.signup("alice")
    spaces = api.get(user, "/v1/spaces").json()["spaces"]
    assert [s["id"] for s in spaces] == [user.home]
    assert spaces[0]["role"] == "owner" and spaces[0]["owner"] == "alice"
    devices = api.get(user, "/v1/devices").json()["devices"]
    assert [(d["name"], d["current"]) for d in devices] == [("laptop", True)]


def test_signup_taken_name_is_409(api: Api):
    api.signup("bob")
    r = api.http.post(
        "/v1/signup",
        json={
            "name": "bob",
            "auth_key": b64(b"k" * 32),
            "kdf": {"salt": b64(b"s" * 16), "n": 1024, "r": 8, "p": 1},
            "public_key": b64(b"p" * 32),
            "wrapped_private_key": b64(b"w"),
            "home_space_key": b64(b"h"),
            "device_name": "x",
        },
    )
    assert r.status_code == 409 and r.json()["code"] == "user_exists"


def test_prelogin_unknown_name_has_same_shape(api: Api):
    api.signup("carol")
    known = api.http.post("/v1/prelogin", json={"name": "carol"}).json()
    unknown = api.http.post("/v1/prelogin", json={"name": "nobody"}).json()
    again = api.http.post("/v1/prelogin", json={"name": "nobody"}).json()
    assert known.keys() == unknown.keys() and known["kdf"].keys() == unknown["kdf"].keys()
    assert unknown == again  # stable, so repeated probes learn nothing
    assert known["kdf"]["n"] == 1024


def test_login_gives_new_device_and_wrong_password_fails(api: Api):
    alice = api.signup("dave")
    phone = api.login("dave")
    assert phone.device_id != alice.device_id and phone.home == alice.home
    r = api.http.post(
        "/v1/login",
        json={"name": "dave", "auth_key": b64(auth_key_for("dave", "nope")), "device_name": "x"},
    )
    assert r.status_code == 401 and r.json()["code"] == "bad_credentials"
    r = api.http.post(
        "/v1/login",
        json={"name": "ghost", "auth_key": b64(auth_key_for("ghost")), "device_name": "x"},
    )
    assert r.status_code == 401 and r.json()["code"] == "bad_credentials"


def test_revoked_token_fails_at_once(api: Api):
    laptop = api.signup("erin")
    phone = api.login("erin")
    assert api.get(phone, "/v1/spaces").status_code == 200
    r = api.http.delete(f"/v1/devices/{phone.device_id}", headers=laptop.headers)
    assert r.status_code == 204
    r = api.get(phone, "/v1/spaces")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    devices = api.get(laptop, "/v1/devices").json()["devices"]
    assert [d["revoked"] is not None for d in devices] == [False, True]


def test_revoking_another_users_device_is_404(api: Api):
    a = api.signup()
    b = api.signup()
    r = api.http.delete(f"/v1/devices/{b.device_id}", headers=a.headers)
    assert r.status_code == 404
    assert api.get(b, "/v1/spaces").status_code == 200


def test_logout_revokes_own_token(api: Api):
    user = api.signup()
    assert api.post(user, "/v1/logout").status_code == 204
    assert api.get(user, "/v1/devices").status_code == 401
